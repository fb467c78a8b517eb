"""REST API for assistants: `/api/v1/assistants/` and `/api/v1/assistants/{slug}/`, tenant-scoped.

Models must be priced for the tenant, tools must exist for it, and routes must be well formed
before anything is saved; an assistant that conversations still use is refused deletion (409).
"""

from __future__ import annotations

from typing import Any

from django.db import models
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from billing.services import model_priced
from config.rest import Conflict, TenantApi, error_responses
from conversations import gatekeepers
from conversations.models import Assistant
from conversations.rest.serializers import (
    StrictBooleanField,
    StrictCharField,
    StrictIntegerField,
    StrictSerializer,
    StrictSlugField,
)
from routing.rules import ROUTES_SCHEMA, RoutesInvalid, routes_validate
from tools.registry import tools_missing

from . import services

FIELDS = [
    "slug", "name", "model", "system_prompt", "temperature", "max_tokens", "tools", "tool_choice",
    "parallel_tool_calls", "max_tool_rounds", "history_strategy", "history_window_tokens",
    "summary_high_water_tokens", "summary_low_water_tokens", "summary_model", "is_default",
    "response_cache", "response_cache_ttl", "routes",
]
TOOL_CHOICES = ("auto", "required", "none")


@extend_schema_field(ROUTES_SCHEMA)
class RoutesField(serializers.ListField):
    """The routes, documented with the JSON schema the routing engine validates them against."""


class AssistantSerializer(StrictSerializer, serializers.ModelSerializer):
    # JSON types as the schema says them: no "1" for 1, no 0 for "0".
    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField, models.TextField: StrictCharField, models.SlugField: StrictSlugField,
        models.BooleanField: StrictBooleanField, models.PositiveIntegerField: StrictIntegerField,
        models.PositiveSmallIntegerField: StrictIntegerField,
    }
    tools = serializers.ListField(child=serializers.CharField(max_length=64), max_length=128, required=False)
    routes = RoutesField(child=serializers.JSONField(), required=False,
                                   help_text='[{"name": STR, "model": STR, "when": {condition: value}}], first match wins')
    temperature = serializers.FloatField(min_value=0, max_value=2, required=False)
    max_tokens = StrictIntegerField(min_value=1, max_value=1_000_000, required=False)

    class Meta:
        model = Assistant
        fields = FIELDS

    def _priced(self, model: str) -> str:
        if not model_priced(model, tenant_id=self.context["tenant_id"]):
            raise serializers.ValidationError(f"the model {model!r} has no price for this tenant")
        return model

    def validate_tools(self, value: list[str]) -> list[str]:
        missing = tools_missing(tenant_id=self.context["tenant_id"], names=value)
        if missing:
            raise serializers.ValidationError(f"unknown tools: {', '.join(missing)}")
        return list(dict.fromkeys(value))

    def validate_routes(self, value: list[Any]) -> list[dict[str, Any]]:
        try:  # the routing engine's own check: shape, unique names, patterns, depth bounds
            value = routes_validate(value)
        except RoutesInvalid as error:
            raise serializers.ValidationError(str(error)) from None
        for route in value:
            self._priced(route["model"])
            classifier = (route.get("when") or {}).get("classifier")
            if classifier:
                self._priced(classifier["model"])
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        for name in ("model", "summary_model"):
            if name in attrs and not model_priced(attrs[name], tenant_id=self.context["tenant_id"]):
                raise serializers.ValidationError({name: [f"the model {attrs[name]!r} has no price for this tenant"]})
        tools = attrs.get("tools", self.instance.tools if self.instance else [])
        choice = attrs.get("tool_choice", self.instance.tool_choice if self.instance else "auto")
        if choice not in TOOL_CHOICES and choice not in tools:
            raise serializers.ValidationError({"tool_choice": ["auto, required, none or one of the assistant's tools"]})
        return attrs


def _actor(request: Request) -> str:
    return f"api_key:{request.auth.prefix}"


class AssistantListApi(TenantApi):
    @extend_schema(operation_id="assistants_list", responses={200: AssistantSerializer(many=True),
                                                             **error_responses("unauthorized")})
    def get(self, request: Request) -> Response:
        rows = Assistant.objects.for_tenant(self.tenant_id).order_by("slug")
        return Response(AssistantSerializer(rows, many=True).data)

    @extend_schema(operation_id="assistants_create", request=AssistantSerializer,
                   responses={201: AssistantSerializer, **error_responses("invalid_request", "unauthorized", "conflict")})
    def post(self, request: Request) -> Response:
        body = AssistantSerializer(data=request.data, context={"tenant_id": self.tenant_id})
        body.is_valid(raise_exception=True)
        try:
            assistant = services.assistant_save(tenant_id=self.tenant_id, assistant=None, fields=body.validated_data,
                                                  actor_label=_actor(request))
        except services.SlugTaken as error:
            raise Conflict(str(error)) from None
        return Response(AssistantSerializer(assistant).data, status=status.HTTP_201_CREATED)


class AssistantDetailApi(TenantApi):
    def assistant(self, slug: str) -> Assistant:
        return gatekeepers.access_assistant(tenant_id=self.tenant_id, slug=slug)

    @extend_schema(operation_id="assistants_retrieve",
                   responses={200: AssistantSerializer, **error_responses("unauthorized", "not_found")})
    def get(self, request: Request, slug: str) -> Response:
        return Response(AssistantSerializer(self.assistant(slug)).data)

    @extend_schema(operation_id="assistants_partial_update", request=AssistantSerializer(partial=True),
                   responses={200: AssistantSerializer,
                              **error_responses("invalid_request", "unauthorized", "not_found", "conflict")})
    def patch(self, request: Request, slug: str) -> Response:
        assistant = self.assistant(slug)
        body = AssistantSerializer(assistant, data=request.data, partial=True, context={"tenant_id": self.tenant_id})
        body.is_valid(raise_exception=True)
        try:
            assistant = services.assistant_save(tenant_id=self.tenant_id, assistant=assistant,
                                                  fields=body.validated_data, actor_label=_actor(request))
        except services.SlugTaken as error:
            raise Conflict(str(error)) from None
        return Response(AssistantSerializer(assistant).data)

    @extend_schema(operation_id="assistants_destroy",
                   responses={204: None, **error_responses("unauthorized", "not_found", "conflict")})
    def delete(self, request: Request, slug: str) -> Response:
        try:
            services.assistant_delete(assistant=self.assistant(slug), actor_label=_actor(request))
        except services.AssistantInUse as error:
            raise Conflict(str(error)) from None
        return Response(status=status.HTTP_204_NO_CONTENT)
