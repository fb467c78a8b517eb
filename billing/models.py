"""ModelPrice (editable price list) and UsageRecord (append-only ledger, one row per upstream call)."""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.db import models

from tenants.models import TenantManager

MONEY = {"max_digits": 20, "decimal_places": 10}
PER_MILLION = {"max_digits": 12, "decimal_places": 4}


class ModelPrice(models.Model):
    """USD per 1M tokens. A model without a row here has no price and is refused, never free."""

    class Kind(models.TextChoices):
        CHAT = "chat"
        MODERATION = "moderation"
        EMBEDDING = "embedding"  # the response cache's question embeddings: never offered for chat

    # A tenant's own price for the model (self-hosted, a newer model, a negotiated rate); null is
    # the operator's global list. A tenant row overrides the global one for that tenant only.
    tenant = models.ForeignKey(
        "tenants.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="model_prices"
    )
    model = models.CharField(max_length=100)
    # What the model is for: a chat surface never offers or calls a moderation model.
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.CHAT)
    input_per_million = models.DecimalField(**PER_MILLION)
    cached_input_per_million = models.DecimalField(**PER_MILLION)
    output_per_million = models.DecimalField(**PER_MILLION)
    batch_input_per_million = models.DecimalField(**PER_MILLION)
    batch_output_per_million = models.DecimalField(**PER_MILLION)
    context_window = models.PositiveIntegerField(default=128_000)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["model"], condition=models.Q(tenant__isnull=True), name="model_price_global_unique"
            ),
            models.UniqueConstraint(
                fields=["tenant", "model"], condition=models.Q(tenant__isnull=False), name="model_price_tenant_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model} (${self.input_per_million} / ${self.output_per_million} per 1M)"


class TenantPriceManager(models.Manager):
    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().filter(tenant__isnull=False)


class TenantModelPrice(ModelPrice):
    """A tenant's own prices, as the tenant-scoped admin edits them (the global list has its own)."""

    objects = TenantPriceManager()

    class Meta:
        proxy = True
        verbose_name = "tenant price"

    def __str__(self) -> str:
        return f"{self.model} for {self.tenant_id} (${self.input_per_million} / ${self.output_per_million} per 1M)"


class UsageRecord(models.Model):
    """One upstream call. Never updated or deleted; `call_id` makes writes idempotent on retry."""

    class Kind(models.TextChoices):
        CHAT = "chat"
        SUMMARY = "summary"
        MODERATION = "moderation"
        BATCH = "batch"
        COMPLETION = "completion"  # the stateless OpenAI-compatible endpoint
        CACHED = "cached"  # a response-cache hit: no upstream call, cost 0, the list price saved
        EMBEDDING = "embedding"  # the semantic response cache embedding a question

    class Outcome(models.TextChoices):
        OK = "ok"
        ERROR = "error"
        CANCELLED = "cancelled"
        # Booked by the sweep from the last checkpoint of a call whose web process died: a lower
        # bound of what streamed (billing/processes.py).
        INTERRUPTED = "interrupted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    call_id = models.CharField(max_length=64, unique=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="usage_records")
    end_user = models.ForeignKey(
        "tenants.EndUser", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    api_key = models.ForeignKey(
        "tenants.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Plain ids, not foreign keys: the ledger outlives deleted conversations, and billing
    # must not depend on the conversations app.
    conversation_id = models.UUIDField(null=True, blank=True)
    message_id = models.UUIDField(null=True, blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.CHAT)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.OK)
    model = models.CharField(max_length=100)
    # The model the caller asked for (assistant model or /v1 model/alias) when routing chose
    # another; blank when they are the same. `route` names the route that chose `model`.
    requested_model = models.CharField(max_length=100, blank=True, default="")
    route = models.CharField(max_length=100, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    # True when the provider sent no usage and tiktoken counted instead.
    estimated = models.BooleanField(default=False)
    cost_usd = models.DecimalField(**MONEY, default=Decimal("0"))
    # What each cost lever saved on this row against the list price of the requested model (USD,
    # >= 0): the provider's cached-input discount, a response-cache hit, routing to a cheaper
    # model, batch pricing. List price = cost_usd + the four.
    saved_cached_input_usd = models.DecimalField(**MONEY, default=Decimal("0"))
    saved_response_cache_usd = models.DecimalField(**MONEY, default=Decimal("0"))
    saved_routing_usd = models.DecimalField(**MONEY, default=Decimal("0"))
    saved_batch_usd = models.DecimalField(**MONEY, default=Decimal("0"))
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    # The cap leases (their Reservation ids) the call was admitted against and booked through:
    # a leased call has no Reservation of its own, and reconciliation finds its spend by these.
    lease_ids = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    objects = TenantManager()

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "created_at"]),
            models.Index(fields=["conversation_id"]),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.model} {self.prompt_tokens}+{self.completion_tokens} ${self.cost_usd}"


class SpendingCap(models.Model):
    """A hard USD limit over a period, for a tenant, one end user, or one API key."""

    class Scope(models.TextChoices):
        TENANT = "tenant"
        END_USER = "end_user"
        API_KEY = "api_key"

    class Period(models.TextChoices):
        DAY = "day"
        WEEK = "week"
        MONTH = "month"
        LIFETIME = "lifetime"

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="spending_caps")
    scope = models.CharField(max_length=16, choices=Scope.choices, default=Scope.TENANT)
    end_user = models.ForeignKey("tenants.EndUser", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey("tenants.ApiKey", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    period = models.CharField(max_length=16, choices=Period.choices, default=Period.MONTH)
    limit_usd = models.DecimalField(max_digits=14, decimal_places=4)
    alert_thresholds = models.JSONField(default=list, blank=True)  # percentages, e.g. [50, 80, 100]
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantManager()

    def __str__(self) -> str:
        return f"{self.scope} {self.period} ${self.limit_usd}"


class CapPeriod(models.Model):
    """What one cap has spent and holds in reserve during one period, for one subject.

    A new period is a new row (rollover is derived from the clock, never from a reset job),
    so history stays. `subject` is the end user or API key id for per-subject caps.
    """

    cap = models.ForeignKey(SpendingCap, on_delete=models.CASCADE, related_name="periods")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    subject = models.CharField(max_length=64, blank=True, default="")
    period_start = models.DateTimeField()
    # Snapshot of the cap's limit, refreshed at each reservation: the conditional update that
    # admits a call compares against a column of the same row.
    limit_usd = models.DecimalField(max_digits=14, decimal_places=4)
    spent_usd = models.DecimalField(**MONEY, default=Decimal("0"))
    reserved_usd = models.DecimalField(**MONEY, default=Decimal("0"))

    objects = TenantManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["cap", "subject", "period_start"], name="cap_period_unique")
        ]

    def __str__(self) -> str:
        return f"{self.cap} from {self.period_start:%Y-%m-%d}: ${self.spent_usd} spent, ${self.reserved_usd} held"


# A whole Batch API batch's hold (billing.batch_holds.batch_hold): held for up to the batch's window,
# settled by the batch's end, never by the stale-reservation sweep.
BATCH_CALL_PREFIX = "batch-"


class Reservation(models.Model):
    """The worst-case cost of one upstream call, held against every cap that applies."""

    class Status(models.TextChoices):
        HELD = "held"
        SETTLED = "settled"
        EXPIRED = "expired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    call_id = models.CharField(max_length=64, unique=True)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    amount_usd = models.DecimalField(**MONEY)
    period_ids = models.JSONField(default=list)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.HELD)
    actual_usd = models.DecimalField(**MONEY, null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    settled_at = models.DateTimeField(null=True, blank=True)
    # The web process (WebProcess id) whose `/v1` call or cap lease this holds for: should it
    # die, the process sweep settles it at once instead of RESERVATION_TTL_SECONDS later. A
    # plain id: the hold outlives the process's record.
    process_id = models.UUIDField(null=True, blank=True, db_index=True)

    objects = TenantManager()

    class Meta:
        indexes = [models.Index(fields=["status", "created_at"])]


class WebProcess(models.Model):
    """A web process serving `/v1` while it beats: the checkpoints of its calls in flight.

    One row per process, written once per GENERATION_HEARTBEAT_SECONDS (never per chunk). A row
    whose beat is older than GENERATION_STALE_SECONDS belongs to a process that died: the sweep
    (billing/processes.py) deletes it — the claim: one sweeper wins — and books each call's last
    checkpoint, settles the process's exact reservations and returns its leases."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField(auto_now_add=True)
    beat_at = models.DateTimeField(db_index=True)
    # [{call_id, tenant_id, api_key_id, end_user_id, model, price, prompt_tokens,
    #   completion_tokens, reservation_id, leases: [[reservation_id, period_id]]}]
    calls = models.JSONField(default=list, blank=True)

    def __str__(self) -> str:
        return f"{self.host}:{self.pid} (beat {self.beat_at:%H:%M:%S})"


class CapAlert(models.Model):
    """One threshold crossed in one period: the unique constraint makes the alert happen once."""

    cap = models.ForeignKey(SpendingCap, on_delete=models.CASCADE, related_name="alerts")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    subject = models.CharField(max_length=64, blank=True, default="")
    period_start = models.DateTimeField()
    threshold = models.PositiveSmallIntegerField()
    spent_usd = models.DecimalField(**MONEY)
    created_at = models.DateTimeField(auto_now_add=True)
    # The outbox (billing/alerts.py): claimed by one sender, then sent; unsent rows are retried.
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    objects = TenantManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["cap", "subject", "period_start", "threshold"], name="cap_alert_once"
            )
        ]
        indexes = [models.Index(fields=["id"], condition=models.Q(sent_at__isnull=True), name="cap_alert_unsent")]
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.cap}: {self.threshold}% reached (${self.spent_usd})"
