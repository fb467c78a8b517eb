"""ModerationPolicy (one per tenant) and ModerationEvent (every check that tripped, for review)."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from tenants.models import TenantManager

from .rules import categories_validate, patterns_validate, terms_validate

DEFAULT_NOTICE = "This response was withheld by the content policy."


class Action(models.TextChoices):
    BLOCK = "block"
    FLAG = "flag"  # allow, and queue for review


class ModerationPolicy(models.Model):
    """What a tenant checks, in which direction, how, and what happens when a check trips.
    A tenant without a policy is not moderated."""

    tenant = models.OneToOneField("tenants.Tenant", on_delete=models.CASCADE, related_name="moderation_policy")
    check_input = models.BooleanField(default=True)
    check_output = models.BooleanField(default=True)
    # The provider's /v1/moderations (omni-moderation-latest), after the tenant's rules.
    use_provider = models.BooleanField(default=False)
    # Provider categories that count; empty = any flagged category.
    provider_categories = models.JSONField(default=list, blank=True, validators=[categories_validate])
    blocked_terms = models.JSONField(default=list, blank=True, validators=[terms_validate])
    blocked_patterns = models.JSONField(default=list, blank=True, validators=[patterns_validate])
    input_action = models.CharField(max_length=8, choices=Action.choices, default=Action.BLOCK)
    output_action = models.CharField(max_length=8, choices=Action.choices, default=Action.BLOCK)
    stream_check_sentences = models.BooleanField(default=False)
    notice = models.TextField(default=DEFAULT_NOTICE)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantManager()

    class Meta:
        verbose_name_plural = "moderation policies"

    def __str__(self) -> str:
        return f"moderation policy of {self.tenant_id}"


class ModerationEvent(models.Model):
    """One check that tripped: what was checked, what matched, and what was done about it."""

    class Direction(models.TextChoices):
        INPUT = "input"
        OUTPUT = "output"

    class Source(models.TextChoices):
        RULES = "rules"
        PROVIDER = "provider"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="moderation_events")
    direction = models.CharField(max_length=8, choices=Direction.choices)
    source = models.CharField(max_length=16, choices=Source.choices)
    categories = models.JSONField(default=list)
    # The term or pattern as the tenant wrote it, or the provider's categories.
    matched = models.TextField(blank=True, default="")
    action = models.CharField(max_length=8, choices=Action.choices)
    # Plain ids, as in the usage ledger: moderation must not depend on the conversations app.
    conversation_id = models.UUIDField(null=True, blank=True)
    message_id = models.UUIDField(null=True, blank=True)
    end_user = models.ForeignKey(
        "tenants.EndUser", null=True, blank=True, on_delete=models.SET_NULL, related_name="moderation_events"
    )
    excerpt = models.TextField(blank=True, default="")
    reviewed = models.BooleanField(default=False)
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantManager()

    class Meta:
        indexes = [models.Index(fields=["tenant", "reviewed", "created_at"])]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.direction} {self.action} by {self.source}: {', '.join(self.categories)}"
