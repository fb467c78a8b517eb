"""`GET /api/v1/batches/` and `GET /api/v1/batches/{id}/`: the tenant's batches in the REST API
(status, counts, mode, cost), newest first, cursor-paginated like the rest of the API."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from billing.services import money_str
from config.rest import TenantApi, error_responses

from .models import Batch
from .services import NotFound, access_batch, batches_list
from .validation import InvalidBatch


class BatchSerializer(serializers.ModelSerializer):
    id = serializers.CharField(source="public_id")
    counts = serializers.SerializerMethodField()
    cost_usd = serializers.SerializerMethodField(help_text="USD as a decimal string: what the lines cost")
    held_usd = serializers.SerializerMethodField(help_text="USD held on the caps at submit (the worst case)")
    input_file_id = serializers.SerializerMethodField()

    class Meta:
        model = Batch
        fields = ["id", "status", "mode", "endpoint", "input_file_id", "counts", "cost_usd", "held_usd",
                  "metadata", "errors", "created_at", "expires_at", "completed_at", "cancelled_at", "expired_at",
                  "failed_at"]

    def get_counts(self, batch: Batch) -> dict[str, int]:
        return {"total": batch.total, "completed": batch.completed, "failed": batch.failed}

    def get_cost_usd(self, batch: Batch) -> str:
        return money_str(batch.cost_usd)

    def get_held_usd(self, batch: Batch) -> str:
        return money_str(batch.held_usd)

    def get_input_file_id(self, batch: Batch) -> str:
        return f"file-{batch.input_file_id.hex}"


class BatchPageSerializer(serializers.Serializer):
    results = BatchSerializer(many=True)
    has_more = serializers.BooleanField()
    next = serializers.CharField(allow_null=True, help_text="the next page's URL (`after` the last batch here)")


class BatchListApi(TenantApi):
    @extend_schema(
        operation_id="batches_list",
        summary="The tenant's batches, newest first",
        parameters=[
            OpenApiParameter("after", str, description="a batch id: the page starts after it"),
            OpenApiParameter("limit", {"type": "integer", "minimum": 1, "maximum": 100}, description="default 20"),
        ],
        responses={200: BatchPageSerializer, **error_responses("invalid_request", "unauthorized", "not_found")},
    )
    def get(self, request: Request) -> Response:
        # The same cursor as GET /v1/batches (`after` an id, `limit`): one listing rule.
        try:
            page, more = batches_list(tenant_id=self.tenant_id, after=request.query_params.get("after"),
                                      limit=request.query_params.get("limit"))
        except NotFound:
            raise Http404 from None
        except InvalidBatch as error:
            raise ValidationError({error.param or "query": [error.message]}) from None
        following = None
        if more:
            query = request.query_params.copy()
            query["after"] = page[-1].public_id
            following = request.build_absolute_uri(f"{request.path}?{query.urlencode()}")
        return Response({"results": BatchSerializer(page, many=True).data, "has_more": more, "next": following})


class BatchDetailApi(TenantApi):
    @extend_schema(operation_id="batches_retrieve", summary="One batch", responses={200: BatchSerializer,
                                                   **error_responses("unauthorized", "not_found")})
    def get(self, request: Request, batch_id: str) -> Response:
        try:
            batch = access_batch(tenant_id=self.tenant_id, batch_id=batch_id)
        except InvalidBatch:
            raise Http404 from None
        return Response(BatchSerializer(batch).data)
