"""File (an uploaded or produced JSONL), Batch (one Batch API job) and BatchLine (one request of it)."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.db import models

from billing.models import MONEY
from tenants.models import TenantManager


class File(models.Model):
    """A file of the Files API, stored in the database: every process (web, worker) reads the
    same bytes, in embedded and services mode alike. Capped by BATCH_FILE_MAX_BYTES."""

    class Purpose(models.TextChoices):
        BATCH = "batch"
        BATCH_OUTPUT = "batch_output"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    purpose = models.CharField(max_length=16, choices=Purpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.PositiveBigIntegerField()
    content = models.BinaryField()
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantManager()

    @property
    def public_id(self) -> str:
        return f"file-{self.id.hex}"

    def __str__(self) -> str:
        return f"{self.filename} ({self.bytes} bytes)"


class Batch(models.Model):
    class Status(models.TextChoices):
        VALIDATING = "validating"
        IN_PROGRESS = "in_progress"
        FINALIZING = "finalizing"
        COMPLETED = "completed"
        FAILED = "failed"
        EXPIRED = "expired"
        CANCELLING = "cancelling"
        CANCELLED = "cancelled"

    class Mode(models.TextChoices):
        PENDING = "", "not started"
        PROVIDER = "provider"  # the provider's own Batch API ran it, at the batch price
        LOCAL = "local"  # Parley's workers ran the lines, at the normal price

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey("tenants.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.VALIDATING)
    mode = models.CharField(max_length=16, choices=Mode.choices, blank=True, default=Mode.PENDING)
    endpoint = models.CharField(max_length=64, default="/v1/chat/completions")
    completion_window = models.CharField(max_length=8, default="24h")
    metadata = models.JSONField(null=True, blank=True)
    input_file = models.ForeignKey(File, on_delete=models.PROTECT, related_name="+")
    output_file = models.ForeignKey(File, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    error_file = models.ForeignKey(File, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    total = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    provider_batch_id = models.CharField(max_length=128, blank=True, default="")
    # The hold on the caps (billing Reservation id; null: no cap applied) and what it held.
    reservation_id = models.UUIDField(null=True, blank=True)
    held_usd = models.DecimalField(**MONEY, default=Decimal(0))
    cost_usd = models.DecimalField(**MONEY, default=Decimal(0))
    errors = models.JSONField(null=True, blank=True)
    # A worker running the lines (local mode) or polling (provider mode) claims the batch until
    # this time; a claim past it belongs to a dead worker and is taken over (resumable).
    claimed_until = models.DateTimeField(null=True, blank=True)
    polled_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()

    objects = TenantManager()

    class Meta:
        indexes = [models.Index(fields=["tenant", "-created_at"]), models.Index(fields=["status"])]

    @property
    def public_id(self) -> str:
        return f"batch_{self.id.hex}"

    @property
    def ended(self) -> bool:
        return self.status in ENDED

    def __str__(self) -> str:
        return f"{self.public_id} ({self.status}, {self.completed + self.failed}/{self.total})"


ENDED = frozenset({Batch.Status.COMPLETED, Batch.Status.FAILED, Batch.Status.EXPIRED, Batch.Status.CANCELLED})


class BatchLine(models.Model):
    """One request of a batch, validated at submit; its answer once run (local mode) or fetched
    (provider mode). `index` names its ledger row (`batch-<batch>:<index>`): a line is booked once."""

    class Status(models.TextChoices):
        PENDING = "pending"
        COMPLETED = "completed"
        FAILED = "failed"
        CANCELLED = "cancelled"

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    index = models.PositiveIntegerField()
    custom_id = models.CharField(max_length=512)
    model = models.CharField(max_length=100)
    body = models.JSONField()
    worst_case_usd = models.DecimalField(**MONEY, default=Decimal(0))  # at the normal price
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    # OpenAI's output line: {"status_code", "request_id", "body"} or the error object.
    response = models.JSONField(null=True, blank=True)
    error = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["batch", "index"], name="batch_line_unique")]
        ordering = ["index"]
