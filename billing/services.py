"""Cost and the usage ledger."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from uuid import UUID

from django.db import IntegrityError, transaction
from django.db.models import Q

from observability import metrics

from .models import ModelPrice, UsageRecord

logger = logging.getLogger(__name__)

MILLION = Decimal(1_000_000)
COST_PLACES = Decimal("0.0000000001")


class PriceMissing(Exception):
    """The model has no price: calls to it are refused, never free."""

    def __init__(self, model: str) -> None:
        super().__init__(f"no price is configured for model {model!r}")
        self.model = model


@dataclass(frozen=True)
class Price:
    model: str
    input: Decimal
    cached_input: Decimal
    output: Decimal
    context_window: int
    # The Batch API's rates (None: not known here, e.g. a price rebuilt from a checkpoint).
    batch_input: Decimal | None = None
    batch_output: Decimal | None = None

    @classmethod
    def of(cls, row: ModelPrice) -> Price:
        return cls(
            model=row.model,
            input=row.input_per_million,
            cached_input=row.cached_input_per_million,
            output=row.output_per_million,
            context_window=row.context_window,
            batch_input=row.batch_input_per_million,
            batch_output=row.batch_output_per_million,
        )

    def batch(self) -> Price:
        """What a line run by the provider's Batch API costs: the batch columns, cached input no
        dearer than batch input (there is no batch column for it)."""
        batch_input = self.input if self.batch_input is None else self.batch_input
        return Price(model=self.model, input=batch_input, cached_input=min(self.cached_input, batch_input),
                     output=self.output if self.batch_output is None else self.batch_output,
                     context_window=self.context_window)

    def cost(self, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Decimal:
        cached = min(cached_tokens, prompt_tokens)
        total = (
            (prompt_tokens - cached) * self.input
            + cached * self.cached_input
            + completion_tokens * self.output
        ) / MILLION
        return total.quantize(COST_PLACES, rounding=ROUND_HALF_UP)


def _base_model(model: str) -> str:
    """Providers answer with dated snapshots (gpt-4o-mini-2024-07-18); price them as the family."""
    parts = model.split("-")
    if len(parts) >= 4 and parts[-3].isdigit() and len(parts[-3]) == 4:
        return "-".join(parts[:-3])
    return model


def list_cost(price: Price, *, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """The call at list price: every prompt token at the full input price, no discount. The
    savings columns of the ledger are measured against it."""
    return price.cost(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)


def price_for(model: str, *, kind: str = ModelPrice.Kind.CHAT, tenant_id: int | None = None) -> Price:
    """The model's price for the tenant, for a call of this kind: the tenant's own row when it
    has one (for the model or its family), else the global list (`tenant_id` None: the global
    list only). A model without a price — or priced for another kind of call — raises
    PriceMissing; an explicit zero is a price (a self-hosted model), never a missing one."""
    owners = Q(tenant__isnull=True) | Q(tenant_id=tenant_id) if tenant_id is not None else Q(tenant__isnull=True)
    candidates = ModelPrice.objects.filter(owners, model__in={model, _base_model(model)}, kind=kind)
    rows = {(row.tenant_id, row.model): row for row in candidates}
    for owner in (tenant_id, None):
        row = rows.get((owner, model)) or rows.get((owner, _base_model(model)))
        if row is not None:
            return Price.of(row)
    raise PriceMissing(model)


def prices_visible(*, tenant_id: int, kind: str = ModelPrice.Kind.CHAT) -> dict[str, ModelPrice]:
    """Model name → the price row the tenant pays by: its own rows over the global list."""
    rows = ModelPrice.objects.filter(Q(tenant__isnull=True) | Q(tenant_id=tenant_id), kind=kind)
    chosen: dict[str, ModelPrice] = {}
    for row in rows.order_by("model"):
        if row.model not in chosen or row.tenant_id is not None:
            chosen[row.model] = row
    return chosen


@dataclass(frozen=True)
class UsageInput:
    call_id: str
    tenant_id: int
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    estimated: bool = False
    kind: str = UsageRecord.Kind.CHAT
    outcome: str = UsageRecord.Outcome.OK
    end_user_id: UUID | None = None
    api_key_id: int | None = None
    conversation_id: UUID | None = None
    message_id: UUID | None = None
    latency_ms: int | None = None
    ttft_ms: int | None = None
    lease_ids: tuple[str, ...] = ()  # the cap leases the call was booked through
    # Routing: the model asked for when a route chose another, and the route's name.
    requested_model: str = ""
    route: str = ""
    # What the other levers saved against the list price (the cached-input saving is computed
    # here from the tokens; these the lever that knows them passes).
    saved_response_cache_usd: Decimal = Decimal(0)
    saved_routing_usd: Decimal = Decimal(0)
    saved_batch_usd: Decimal = Decimal(0)
    requested_price: Price | None = None  # the requested model's price: what routing saved


def usage_record(*, usage: UsageInput, price: Price) -> UsageRecord:
    """Append one ledger row. Idempotent on call_id: a retried write returns the first row."""
    return usage_record_created(usage=usage, price=price)[0]


def usage_record_created(*, usage: UsageInput, price: Price) -> tuple[UsageRecord, bool]:
    """usage_record, and whether this call wrote the row (False: a retry found the first)."""
    fields: dict[str, Any] = {
        name: getattr(usage, name) for name in UsageInput.__dataclass_fields__
        if name not in ("call_id", "requested_price")
    }
    fields["lease_ids"] = list(usage.lease_ids)
    fields["cost_usd"] = price.cost(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
    )
    # The provider's prompt cache: cached tokens at (input - cached input) below list price.
    listed = list_cost(price, prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)
    fields["saved_cached_input_usd"] = max(listed - fields["cost_usd"], Decimal(0))
    if usage.requested_price is not None:
        fields["saved_routing_usd"] = routing_saving(usage, price=price, requested=usage.requested_price)
    try:
        with transaction.atomic():
            record = UsageRecord.objects.create(call_id=usage.call_id, **fields)
    except IntegrityError:
        return UsageRecord.objects.get(call_id=usage.call_id), False
    # Counted once the row is committed: /metrics' tokens and USD are the ledger's, never a
    # booking that rolled back.
    logger.info("usage booked: %s %s %s prompt %d completion %d cached %d tokens $%f", usage.kind, usage.call_id,
                usage.model, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, record.cost_usd)
    transaction.on_commit(lambda: metrics.usage_booked(
        tenant_id=usage.tenant_id, model=usage.model, kind=usage.kind, prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens, cached_tokens=usage.cached_tokens, cost_usd=record.cost_usd,
        ttft_ms=usage.ttft_ms, latency_ms=usage.latency_ms,
    ))
    return record, True


def routing_saving(usage: UsageInput, *, price: Price, requested: Price) -> Decimal:
    """The same tokens at the requested model's list price less at the chosen one's, both
    without the cached-input discount (that lever is saved_cached_input_usd's); never below 0."""
    tokens = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    return max(requested.cost(**tokens) - price.cost(**tokens), Decimal(0))


def money_str(amount: Decimal) -> str:
    """A cost for the wire: plain decimal notation, no trailing zeros, never an exponent."""
    if not amount:
        return "0"
    return f"{amount.normalize():f}"


def model_priced(model: str, *, tenant_id: int | None, kind: str = ModelPrice.Kind.CHAT) -> bool:
    """Whether calls to the model would be priced for the tenant (`price_for` would answer)."""
    try:
        price_for(model, kind=kind, tenant_id=tenant_id)
    except PriceMissing:
        return False
    return True
