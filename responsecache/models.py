"""CachedAnswer: one stored answer to one question, per tenant and per assistant version."""

from __future__ import annotations

import uuid

from django.db import models

from tenants.models import TenantManager


class CachedAnswer(models.Model):
    """An answer reused for the same question (`key`) or, semantically, a close one (`embedding`).

    `scope` is what the answer depends on besides the question: `a{assistant}.{version}` for a
    chat assistant (the version hashes its prompt, model and settings, so editing it leaves its
    entries unreachable) or `v1` for whole `/v1` requests. Entries are never updated in place
    but for their hit count; an expired one is ignored and replaced."""

    class Kind(models.TextChoices):
        EXACT = "exact", "Exact question"
        SEMANTIC = "semantic", "Semantic (embedding)"
        REQUEST = "request", "/v1 request"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    # A plain id, not a foreign key: this app sits below conversations (null for /v1 entries).
    assistant_id = models.BigIntegerField(null=True, blank=True)
    scope = models.CharField(max_length=100)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    key = models.CharField(max_length=64)  # SHA-256 of the normalised question or canonical request
    question = models.TextField()
    # float32 little-endian, L2-normalised (cosine = dot product); empty unless semantic.
    embedding = models.BinaryField(blank=True, default=b"", editable=False)
    answer = models.TextField()
    finish_reason = models.CharField(max_length=32, default="stop")
    model = models.CharField(max_length=100)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    hits = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    objects = TenantManager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "scope", "key"], name="cached_answer_unique_key")]
        # The semantic candidates: one scope's newest entries.
        indexes = [models.Index(fields=["tenant", "scope", "-created_at"], name="cached_answer_newest")]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.question[:80]
