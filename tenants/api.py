"""GET, PATCH /api/v1/tenant/: the calling API key's tenant, and the settings it edits itself."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.rest import error_responses

from .models import Tenant
from .origins import MAX_ORIGINS, ORIGIN_PATTERN, InvalidOrigin, origins_parse, tenant_allowed_origins_set


class TenantSerializer(serializers.Serializer):
    slug = serializers.CharField()
    name = serializers.CharField()
    allowed_origins = serializers.ListField(
        child=serializers.CharField(),
        help_text="Websites whose pages may open end-user token sockets (the chat widget): scheme://host[:port].",
    )


class OriginListField(serializers.ListField):
    child = serializers.RegexField(ORIGIN_PATTERN, max_length=300, help_text="scheme://host[:port]")

    def to_internal_value(self, data: Any) -> list[str]:
        if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
            raise serializers.ValidationError("a list of origin strings")
        if len(data) > MAX_ORIGINS:  # as sent, as the schema's maxItems says (duplicates count)
            raise serializers.ValidationError(f"at most {MAX_ORIGINS} allowed origins")
        try:
            return origins_parse(super().to_internal_value(data))
        except InvalidOrigin as error:
            raise serializers.ValidationError(str(error)) from None


class TenantPatchRequestSerializer(serializers.Serializer):
    allowed_origins = OriginListField(
        max_length=MAX_ORIGINS, required=False, help_text="Replaces the list; [] allows none; absent keeps it."
    )

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict) and set(data) - set(self.fields):  # unknown fields are refused
            raise serializers.ValidationError({name: ["unknown field"] for name in sorted(set(data) - set(self.fields))})
        return super().to_internal_value(data)


class TenantDetailApi(APIView):
    @extend_schema(operation_id="tenant_retrieve", responses={200: TenantSerializer, **error_responses("unauthorized")})
    def get(self, request: Request) -> Response:
        return Response(TenantSerializer(Tenant.objects.get(pk=request.auth.tenant_id)).data)

    @extend_schema(
        operation_id="tenant_partial_update",
        request=TenantPatchRequestSerializer,
        responses={200: TenantSerializer, **error_responses("invalid_request", "unauthorized")},
    )
    def patch(self, request: Request) -> Response:
        body = TenantPatchRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        tenant = Tenant.objects.get(pk=request.auth.tenant_id)
        if "allowed_origins" in body.validated_data:
            tenant_allowed_origins_set(tenant=tenant, origins=body.validated_data["allowed_origins"])
        return Response(TenantSerializer(tenant).data)
