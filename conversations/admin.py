"""Admin for assistants and conversations (a read-only transcript), scoped to the user's tenants."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.paginator import Page, Paginator
from django.db.models import Count, Sum
from django.http import HttpRequest, HttpResponse

from billing.models import UsageRecord
from billing.services import model_priced
from routing.admin import routes_clean
from tenants.admin_base import TenantScopedAdmin, TenantScopedForm

from .models import Assistant, Conversation, Message

TRANSCRIPT_PAGE_SIZE = 200
OTHER_USAGE_LIMIT = 50


class AssistantForm(TenantScopedForm):
    """A model without a price is refused at chat time: say so when the assistant is saved
    (priced for the assistant's tenant: its own price or the global list)."""

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        tenant = cleaned.get("tenant")
        tenant_id = tenant.pk if tenant is not None else self.instance.tenant_id or self._known_tenant_id()
        for name in ("model", "summary_model"):
            if cleaned.get(name) and not model_priced(cleaned[name], tenant_id=tenant_id):
                self.add_error(name, "This model has no price for this tenant.")
        return cleaned

    def clean_routes(self) -> list:
        return routes_clean(self.cleaned_data.get("routes"))


@admin.register(Assistant)
class AssistantAdmin(TenantScopedAdmin):
    form = AssistantForm
    list_display = ("slug", "name", "model", "response_cache", "is_default", "updated_at")
    list_filter = ("model", "response_cache", "is_default")
    search_fields = ("slug", "name", "model")
    ordering = ("slug",)
    # No field list: every setting the assistant model grows is editable here, in model order.


@dataclass(frozen=True)
class TranscriptLine:
    message: Message
    cost_usd: Decimal | None

    @property
    def tool_calls_json(self) -> str:
        """Pretty-printed JSON (the template escapes it), not a Python repr."""
        return json.dumps(self.message.tool_calls, indent=2, ensure_ascii=False) if self.message.tool_calls else ""


@admin.register(Conversation)
class ConversationAdmin(TenantScopedAdmin):
    """Conversations are written by the chat engine only: here they are read, or deleted."""

    list_display = ("__str__", "assistant", "end_user", "updated_at")
    list_filter = ("assistant",)
    search_fields = ("title", "end_user__external_id")
    ordering = ("-updated_at",)
    list_select_related = ("assistant", "end_user", "tenant")
    fields = ("tenant", "title", "assistant", "end_user", "last_seq", "summary_through_seq", "created_at", "updated_at")
    date_hierarchy = "updated_at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict | None = None
    ) -> HttpResponse:
        conversation = self.get_object(request, unquote(object_id))
        if conversation is not None:  # a missing or foreign one goes to the standard redirect
            extra_context = {**(extra_context or {}), **transcript_context(conversation, request)}
        return super().change_view(request, object_id, form_url, extra_context)


def transcript_context(conversation: Conversation, request: HttpRequest) -> dict[str, Any]:
    """One page of messages in seq order, their costs, and the conversation's usage totals."""
    messages = Message.objects.filter(conversation=conversation, tenant_id=conversation.tenant_id).order_by("seq")
    page = Paginator(messages, TRANSCRIPT_PAGE_SIZE).get_page(request.GET.get("p"))
    ids = [message.id for message in page.object_list]
    usage = UsageRecord.objects.for_tenant(conversation.tenant_id).filter(conversation_id=conversation.id)
    page_usage = list(usage.filter(message_id__in=ids).order_by("created_at"))
    other_usage = list(usage.filter(message_id__isnull=True).order_by("-created_at")[:OTHER_USAGE_LIMIT])
    return {
        "transcript": _lines(page, page_usage),
        "transcript_page": page,
        "usage_records": page_usage + other_usage,
        "usage_totals": usage.aggregate(
            calls=Count("id"),
            cost=Sum("cost_usd"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
        ),
        "summary": conversation.summary,
    }


def _lines(page: Page, records: list[UsageRecord]) -> list[TranscriptLine]:
    costs: dict[UUID, Decimal] = {}
    for record in records:
        costs[record.message_id] = costs.get(record.message_id, Decimal(0)) + record.cost_usd
    return [TranscriptLine(message=message, cost_usd=costs.get(message.id)) for message in page.object_list]
