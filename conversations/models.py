"""Assistant, Conversation, Message."""

from __future__ import annotations

import uuid

from django.db import models

from tenants.models import TenantManager


class Assistant(models.Model):
    class HistoryStrategy(models.TextChoices):
        FULL = "full", "Full history (everything that fits the context window)"
        WINDOW = "window", "Sliding window (the most recent messages within a token budget)"
        SUMMARIZE = "summarize", "Summarise (summary of older turns + recent messages)"

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="assistants")
    slug = models.SlugField(max_length=64)
    name = models.CharField(max_length=200, blank=True, default="")
    system_prompt = models.TextField(blank=True, default="")
    model = models.CharField(max_length=100, default="gpt-4o-mini")
    temperature = models.FloatField(default=0.7)
    max_tokens = models.PositiveIntegerField(default=1024)
    credential = models.ForeignKey(
        "tenants.ProviderCredential", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Names of enabled tools (built-in or the tenant's webhook tools).
    tools = models.JSONField(default=list, blank=True)
    # "auto", "required", "none", or the name of one enabled tool the model must call.
    tool_choice = models.CharField(max_length=64, default="auto")
    parallel_tool_calls = models.BooleanField(default=True)
    # Tool rounds per turn before the model is asked for a final answer with tools disabled.
    max_tool_rounds = models.PositiveSmallIntegerField(default=5)
    history_strategy = models.CharField(
        max_length=16, choices=HistoryStrategy.choices, default=HistoryStrategy.SUMMARIZE
    )
    # Sliding window: history tokens kept. Summarise: compact when the unsummarised history
    # passes the high-water mark, down to the low-water mark.
    history_window_tokens = models.PositiveIntegerField(default=4000)
    summary_high_water_tokens = models.PositiveIntegerField(default=16000)
    summary_low_water_tokens = models.PositiveIntegerField(default=1500)
    summary_model = models.CharField(max_length=100, default="gpt-4o-mini")
    class ResponseCache(models.TextChoices):
        OFF = "off", "Off"
        EXACT = "exact", "Exact question (normalised)"
        SEMANTIC = "semantic", "Semantic (embedding similarity)"

    # Answers to a conversation's first question, reused for the same (or a similar) question.
    response_cache = models.CharField(max_length=16, choices=ResponseCache.choices, default=ResponseCache.OFF)
    response_cache_ttl = models.PositiveIntegerField(default=86_400)
    # Ordered routes, first match wins, `model` otherwise: [{"name", "model", "when": {...}}].
    routes = models.JSONField(default=list, blank=True)
    is_default = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "slug"], name="assistant_unique_slug"),
            models.UniqueConstraint(
                fields=["tenant"], condition=models.Q(is_default=True), name="assistant_one_default"
            ),
        ]

    def __str__(self) -> str:
        return self.slug


class Conversation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="conversations")
    assistant = models.ForeignKey(Assistant, on_delete=models.PROTECT, related_name="conversations")
    end_user = models.ForeignKey("tenants.EndUser", on_delete=models.CASCADE, related_name="conversations")
    title = models.CharField(max_length=200, blank=True, default="")
    # Rolling summary of messages up to and including summary_through_seq (0: none yet).
    summary = models.TextField(blank=True, default="")
    summary_through_seq = models.PositiveIntegerField(default=0)
    summary_tokens = models.PositiveIntegerField(default=0)
    # A summary task's claim, across workers; expires if the worker dies mid-task.
    summary_claimed_until = models.DateTimeField(null=True, blank=True)
    # Highest seq handed out; bumped under the row lock that claims a generation.
    last_seq = models.PositiveIntegerField(default=0)
    # The running generation, if any: one at a time per conversation, across processes.
    generation_id = models.UUIDField(null=True, blank=True)
    generation_channel = models.CharField(max_length=200, blank=True, default="")
    generation_started_at = models.DateTimeField(null=True, blank=True)
    # Refreshed by the generating process while it runs; a stale beat means it died.
    generation_beat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantManager()

    class Meta:
        indexes = [models.Index(fields=["tenant", "end_user", "-updated_at"])]

    def __str__(self) -> str:
        return self.title or str(self.id)


class Message(models.Model):
    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"
        TOOL = "tool"

    class Status(models.TextChoices):
        COMPLETE = "complete"
        INCOMPLETE = "incomplete"
        ERROR = "error"
        BLOCKED = "blocked"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    seq = models.PositiveIntegerField()
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True, default="")
    tool_calls = models.JSONField(null=True, blank=True)
    tool_call_id = models.CharField(max_length=100, blank=True, default="")
    # Prompt tokens this message costs, framing included; counted once, when written.
    tokens = models.PositiveIntegerField(default=0)
    model = models.CharField(max_length=100, blank=True, default="")
    # The route that chose `model` (blank: the assistant's own model), and whether the answer
    # came from the response cache.
    route = models.CharField(max_length=100, blank=True, default="")
    cached = models.BooleanField(default=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    finish_reason = models.CharField(max_length=32, blank=True, default="")
    client_msg_id = models.CharField(max_length=100, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["conversation", "seq"], name="message_unique_seq")
        ]
        ordering = ["seq"]

    def __str__(self) -> str:
        return f"{self.role}#{self.seq}"
