"""The tenant's batches in the admin: read-only (status, counts, mode, cost), with a cancel action."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest

from tenants.admin_base import TenantScopedAdmin

from .models import Batch
from .services import batch_cancel

FIELDS = (
    "public_id", "status", "mode", "endpoint", "total", "completed", "failed", "held_usd", "cost_usd",
    "provider_batch_id", "metadata", "errors", "created_at", "in_progress_at", "completed_at", "cancelled_at",
    "expired_at", "failed_at", "expires_at",
)


@admin.register(Batch)
class BatchAdmin(TenantScopedAdmin):
    """Batches are made over `/v1/batches`; here they are read, and cancelled by owners and admins."""

    list_display = ("public_id", "created_at", "status", "mode", "total", "completed", "failed", "cost_usd")
    list_filter = ("status", "mode")
    ordering = ("-created_at",)
    fields = FIELDS
    readonly_fields = FIELDS
    actions = ("cancel",)
    show_full_result_count = False

    @admin.display(description="id")
    def public_id(self, obj: Batch) -> str:
        return obj.public_id

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(description="Cancel selected batches (lines not yet run cost nothing)", permissions=["change"])
    def cancel(self, request: HttpRequest, queryset: QuerySet) -> None:
        count = 0
        with transaction.atomic():
            for batch in self.editable(request, queryset):
                if not batch.ended:
                    batch_cancel(batch=batch)
                    count += 1
        self.message_user(request, f"Asked {count} batch(es) to cancel.", messages.SUCCESS)
