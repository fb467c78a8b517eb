"""Admin for the response cache: each tenant's cached answers, listed; deleting one invalidates it."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from tenants.admin_base import TenantScopedAdmin

from .models import CachedAnswer


@admin.register(CachedAnswer)
class CachedAnswerAdmin(TenantScopedAdmin):
    """Entries are made by answers, never by hand: no adding or editing, only deleting (the
    question is then answered by the model again, and its answer cached afresh)."""

    list_display = ("question_short", "kind", "assistant_id", "model", "hits", "created_at", "expires_at")
    list_filter = ("kind", "model")
    search_fields = ("question", "answer")
    ordering = ("-created_at",)
    fields = ("tenant", "kind", "assistant_id", "scope", "question", "answer", "model", "finish_reason",
              "prompt_tokens", "completion_tokens", "hits", "created_at", "expires_at")

    @admin.display(description="question")
    def question_short(self, entry: CachedAnswer) -> str:
        return entry.question[:120]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
