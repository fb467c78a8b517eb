"""Cost and the usage ledger."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from uuid import UUID

from django.db import IntegrityError, transaction

from .models import ModelPrice, UsageRecord

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

    @classmethod
    def of(cls, row: ModelPrice) -> Price:
        return cls(
            model=row.model,
            input=row.input_per_million,
            cached_input=row.cached_input_per_million,
            output=row.output_per_million,
            context_window=row.context_window,
        )

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


def price_for(model: str, *, kind: str = ModelPrice.Kind.CHAT) -> Price:
    """The model's price, for a call of this kind. A model without a price — or priced for
    another kind of call — raises PriceMissing."""
    rows = {
        row.model: row for row in ModelPrice.objects.filter(
            model__in={model, _base_model(model)}, kind=kind, tenant__isnull=True
        )
    }
    row = rows.get(model) or rows.get(_base_model(model))
    if row is None:
        raise PriceMissing(model)
    return Price.of(row)


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
    saved_response_cache_usd: Decimal = Decimal(0)  # a response-cache hit: the list cost it saved


def usage_record(*, usage: UsageInput, price: Price) -> UsageRecord:
    """Append one ledger row. Idempotent on call_id: a retried write returns the first row."""
    fields: dict[str, Any] = {
        name: getattr(usage, name) for name in UsageInput.__dataclass_fields__ if name != "call_id"
    }
    fields["lease_ids"] = list(usage.lease_ids)
    fields["cost_usd"] = price.cost(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
    )
    try:
        with transaction.atomic():
            return UsageRecord.objects.create(call_id=usage.call_id, **fields)
    except IntegrityError:
        return UsageRecord.objects.get(call_id=usage.call_id)


def money_str(amount: Decimal) -> str:
    """A cost for the wire: plain decimal notation, no trailing zeros, never an exponent."""
    if not amount:
        return "0"
    return f"{amount.normalize():f}"
