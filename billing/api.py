"""GET /api/v1/usage/: the tenant's spend from the ledger, in total and by day, model or end user."""

from __future__ import annotations

from datetime import UTC, datetime, time

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .selectors import GROUPINGS, usage_summary
from .services import money_str


class UsageQuerySerializer(serializers.Serializer):
    start = serializers.DateTimeField(required=False, help_text="inclusive; a date means its UTC midnight")
    end = serializers.DateTimeField(required=False, help_text="exclusive; default now")
    group_by = serializers.ChoiceField(choices=sorted(GROUPINGS), required=False)

    def to_internal_value(self, data):
        data = {key: _midnight(value) for key, value in data.items()}
        return super().to_internal_value(data)

    def validate(self, attrs):
        # An empty or inverted range is simply empty: it holds no usage.
        end = attrs.get("end") or datetime.now(UTC)
        start = attrs.get("start") or end.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return {"start": start, "end": end, "group_by": attrs.get("group_by")}


def _midnight(value):
    """`2026-11-01` is accepted as that day's UTC midnight."""
    if isinstance(value, str) and len(value) == 10:
        try:
            return datetime.combine(datetime.fromisoformat(value).date(), time(), tzinfo=UTC).isoformat()
        except ValueError:
            return value
    return value


class SavingsSerializer(serializers.Serializer):
    cached_input = serializers.CharField(help_text="the provider's cached-input discount, USD")
    response_cache = serializers.CharField(help_text="response-cache hits, USD")
    routing = serializers.CharField(help_text="routing to a cheaper model than the one asked for, USD")
    batch = serializers.CharField(help_text="Batch API pricing, USD")
    total = serializers.CharField()


class UsageRowSerializer(serializers.Serializer):
    key = serializers.CharField(allow_null=True, required=False)
    requests = serializers.IntegerField()
    prompt_tokens = serializers.IntegerField()
    cached_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    cost_usd = serializers.CharField(help_text="USD as a decimal string")
    savings = SavingsSerializer(help_text="what each cost lever saved against list price, USD")
    list_cost = serializers.CharField(help_text="cost_usd + savings.total: the same calls at list price, USD")


class UsageSerializer(serializers.Serializer):
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    group_by = serializers.CharField(allow_null=True)
    totals = UsageRowSerializer()
    months = UsageRowSerializer(many=True, help_text="per UTC calendar month in the range (key: YYYY-MM)")
    groups = UsageRowSerializer(many=True, required=False)


# The REST API's one error shape (mapped by the project's DRF exception handler).
ERROR = inline_serializer(
    name="UsageError",
    fields={
        "error": inline_serializer(
            name="UsageErrorDetail",
            fields={"code": serializers.CharField(), "message": serializers.CharField()},
        )
    },
)


def _row(row: dict) -> dict:
    savings = {lever: money_str(amount) for lever, amount in row["savings"].items()}
    return {**row, "cost_usd": money_str(row["cost_usd"]), "savings": savings, "list_cost": money_str(row["list_cost"])}


class UsageApi(APIView):
    @extend_schema(
        summary="Usage and cost from the ledger",
        parameters=[
            OpenApiParameter(
                "start", OpenApiTypes.DATETIME,
                description="inclusive (default: start of this month, UTC); a plain date means its UTC midnight",
            ),
            OpenApiParameter("end", OpenApiTypes.DATETIME, description="exclusive (default: now)"),
            OpenApiParameter("group_by", str, enum=sorted(GROUPINGS)),
        ],
        responses={200: UsageSerializer, 400: ERROR, 401: ERROR, 429: ERROR},
    )
    def get(self, request: Request) -> Response:
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        summary = usage_summary(tenant_id=request.auth.tenant_id, **query.validated_data)
        body = {**summary, "totals": _row(summary["totals"]), "months": [_row(row) for row in summary["months"]]}
        if "groups" in summary:
            body["groups"] = [_row(row) for row in summary["groups"]]
        return Response(UsageSerializer(body).data)
