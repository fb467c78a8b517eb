"""`GET /api/v1/batches/` and `GET /api/v1/batches/{id}/`: the tenant's batches in the REST API
(status, counts, mode, cost), newest first, cursor-paginated like the rest of the API."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response

from billing.services import money_str
from config.rest import TenantApi, error_responses

from .models import Batch
from .services import access_batch
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


class NewestFirst(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200


class BatchListApi(TenantApi):
    @extend_schema(summary="The tenant's batches", responses={200: BatchSerializer(many=True),
                                                              **error_responses("unauthorized")})
    def get(self, request: Request) -> Response:
        paginator = NewestFirst()
        page = paginator.paginate_queryset(Batch.objects.for_tenant(self.tenant_id), request, view=self)
        return paginator.get_paginated_response(BatchSerializer(page, many=True).data)


class BatchDetailApi(TenantApi):
    @extend_schema(summary="One batch", responses={200: BatchSerializer,
                                                   **error_responses("unauthorized", "not_found")})
    def get(self, request: Request, batch_id: str) -> Response:
        try:
            batch = access_batch(tenant_id=self.tenant_id, batch_id=batch_id)
        except InvalidBatch:
            raise Http404 from None
        return Response(BatchSerializer(batch).data)
