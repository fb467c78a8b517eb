"""Admin for moderation: each tenant's policy, and the review queue of events that tripped."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from tenants.admin_base import TenantScopedAdmin

from .models import ModerationEvent, ModerationPolicy
from .services import EventNotFound, event_review


@admin.register(ModerationPolicy)
class ModerationPolicyAdmin(TenantScopedAdmin):
    list_display = ("tenant", "check_input", "input_action", "check_output", "output_action", "use_provider", "updated_at")
    fieldsets = (
        (None, {"fields": ("tenant", "check_input", "input_action", "check_output", "output_action", "notice")}),
        ("Tenant rules", {"fields": ("blocked_terms", "blocked_patterns")}),
        ("Provider", {"fields": ("use_provider", "provider_categories", "stream_check_sentences")}),
    )


@admin.register(ModerationEvent)
class ModerationEventAdmin(TenantScopedAdmin):
    """The review queue: what tripped, where, and whether someone has looked at it."""

    read_only = True
    list_display = ("created_at", "direction", "source", "action", "categories", "matched", "excerpt_short", "reviewed")
    list_filter = ("reviewed", "direction", "source", "action")
    search_fields = ("matched", "excerpt")
    ordering = ("-created_at",)
    actions = ["mark_reviewed"]

    @admin.display(description="excerpt")
    def excerpt_short(self, event: ModerationEvent) -> str:
        return event.excerpt[:120]

    @admin.action(description="Mark as reviewed")
    def mark_reviewed(self, request: HttpRequest, queryset: QuerySet) -> None:
        if not self._can_edit(request, None):
            self.message_user(request, "Only owners and admins can review events.", messages.ERROR)
            return
        reviewed = 0
        for event in queryset:
            if not self._can_edit(request, event):
                continue
            try:
                event_review(event_id=event.pk, tenant_id=event.tenant_id, user=request.user)
            except EventNotFound:
                continue
            reviewed += 1
        self.message_user(request, f"{reviewed} event(s) marked as reviewed.", messages.SUCCESS)
