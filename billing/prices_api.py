"""REST API for a tenant's prices: `/api/v1/prices/` and `/api/v1/prices/{model}/`.

The list shows what the tenant pays by: its own rows (`"source": "tenant"`) and the global
prices it falls back on (`"source": "global"`). Only its own rows can be changed or deleted.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import exceptions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from config.rest import Conflict, TenantApi, error_responses

from .models import ModelPrice
from .prices import PriceNotFound, PriceTaken, access_tenant_price, price_create, price_delete, price_update
from .services import prices_visible

MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$"  # vLLM names carry an org: meta-llama/Llama-3-8B
PER_MILLION = {"max_digits": 12, "decimal_places": 4, "min_value": 0}


@extend_schema_field({"type": "string", "format": "decimal", "pattern": r"^\d{1,8}(\.\d{1,4})?$"})
class UsdPerMillionField(serializers.DecimalField):
    """USD per 1M tokens as a decimal string (money is never a float on the wire); 0 is free."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)

PRICE_FIELDS = ["input_per_million", "cached_input_per_million", "output_per_million",
                "batch_input_per_million", "batch_output_per_million"]


class ModelNameField(serializers.RegexField):
    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):  # a JSON string, not anything str() accepts
            self.fail("invalid")
        return super().to_internal_value(data)


class PriceSerializer(serializers.Serializer):
    model = ModelNameField(MODEL_NAME, max_length=100)
    kind = serializers.ChoiceField(choices=ModelPrice.Kind.choices, default=ModelPrice.Kind.CHAT)
    input_per_million = UsdPerMillionField(**PER_MILLION, help_text="USD per 1M input tokens; 0 is free")
    cached_input_per_million = UsdPerMillionField(**PER_MILLION, required=False, help_text="default: the input price")
    output_per_million = UsdPerMillionField(**PER_MILLION)
    batch_input_per_million = UsdPerMillionField(**PER_MILLION, required=False, help_text="default: the input price")
    batch_output_per_million = UsdPerMillionField(**PER_MILLION, required=False, help_text="default: the output price")
    context_window = serializers.IntegerField(min_value=1, max_value=100_000_000, default=128_000)
    source = serializers.SerializerMethodField(help_text="tenant: the tenant's own price; global: the operator's list")
    updated_at = serializers.DateTimeField(read_only=True)

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(self.fields) - {"source", "updated_at"} - ({"model"} if self.partial else set())
            unknown = set(data) - known
            if unknown:
                raise serializers.ValidationError({name: ["unknown or read-only field"] for name in sorted(unknown)})
        return super().to_internal_value(data)

    def get_source(self, row: ModelPrice) -> str:
        return "global" if row.tenant_id is None else "tenant"


class PriceChangeSerializer(PriceSerializer):
    """A change to a tenant's price: the model is the one in the path."""

    model = None


class PriceListApi(TenantApi):
    @extend_schema(operation_id="prices_list", responses={200: PriceSerializer(many=True), **error_responses("unauthorized")})
    def get(self, request: Request) -> Response:
        rows = [row for kind in ModelPrice.Kind for row in prices_visible(tenant_id=self.tenant_id, kind=kind).values()]
        return Response(PriceSerializer(rows, many=True).data)

    @extend_schema(operation_id="prices_create", request=PriceSerializer,
                   responses={201: PriceSerializer, **error_responses("invalid_request", "unauthorized", "conflict")})
    def post(self, request: Request) -> Response:
        body = PriceSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            row = price_create(tenant_id=self.tenant_id, fields=body.validated_data, actor_label=_actor(request))
        except PriceTaken as error:
            raise Conflict(str(error)) from None
        return Response(PriceSerializer(row).data, status=status.HTTP_201_CREATED)


class PriceDetailApi(TenantApi):
    def row(self, model: str) -> ModelPrice:
        try:
            return access_tenant_price(tenant_id=self.tenant_id, model=model)
        except PriceNotFound as error:
            raise exceptions.NotFound(str(error)) from None

    @extend_schema(operation_id="prices_retrieve",
                   responses={200: PriceSerializer, **error_responses("unauthorized", "not_found")})
    def get(self, request: Request, model: str) -> Response:
        """The price the tenant pays for the model: its own, or the global one it falls back on."""
        for kind in ModelPrice.Kind:
            row = prices_visible(tenant_id=self.tenant_id, kind=kind).get(model)
            if row is not None:
                return Response(PriceSerializer(row).data)
        raise exceptions.NotFound(f"no price for {model!r}")

    @extend_schema(operation_id="prices_partial_update", request=PriceChangeSerializer(partial=True),
                   responses={200: PriceSerializer, **error_responses("invalid_request", "unauthorized", "not_found")})
    def patch(self, request: Request, model: str) -> Response:
        row = self.row(model)
        body = PriceChangeSerializer(row, data=request.data, partial=True)
        body.is_valid(raise_exception=True)
        row = price_update(row=row, fields=body.validated_data, actor_label=_actor(request))
        return Response(PriceSerializer(row).data)

    @extend_schema(operation_id="prices_destroy", responses={204: None, **error_responses("unauthorized", "not_found")})
    def delete(self, request: Request, model: str) -> Response:
        price_delete(row=self.row(model), actor_label=_actor(request))
        return Response(status=status.HTTP_204_NO_CONTENT)


def _actor(request: Request) -> str:
    return f"api_key:{request.auth.prefix}"
