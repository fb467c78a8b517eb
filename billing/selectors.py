"""Reads over the ledger: usage summaries and reconciliation of cap counters against it."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from django.db.models import Count, F, Sum
from django.db.models.functions import Coalesce, TruncDay, TruncMonth

from .leases import LEASE_CALL_PREFIX
from .models import BATCH_CALL_PREFIX, CapPeriod, Reservation, UsageRecord
from .services import money_str

GROUPINGS = {
    "day": TruncDay("created_at"),
    "model": F("model"),
    "end_user": F("end_user__external_id"),
}


# What each cost lever saved against list price: the ledger's saved_* columns.
SAVINGS = {
    "cached_input": "saved_cached_input_usd",
    "response_cache": "saved_response_cache_usd",
    "routing": "saved_routing_usd",
    "batch": "saved_batch_usd",
}
SUMS = {
    "requests": Count("id"),
    "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
    "cached_tokens": Coalesce(Sum("cached_tokens"), 0),
    "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
    "cost_usd": Coalesce(Sum("cost_usd"), Decimal(0)),
    **{f"saved_{lever}": Coalesce(Sum(column), Decimal(0)) for lever, column in SAVINGS.items()},
}


def _with_savings(row: dict[str, Any]) -> dict[str, Any]:
    """`savings` per lever and in total, and `list_cost`: what the calls would have cost at
    list price on the model asked for (cost + savings)."""
    savings = {lever: row.pop(f"saved_{lever}") for lever in SAVINGS}
    savings["total"] = sum(savings.values(), Decimal(0))
    return {**row, "savings": savings, "list_cost": row["cost_usd"] + savings["total"]}


def usage_summary(*, tenant_id: int, start: datetime, end: datetime, group_by: str | None) -> dict[str, Any]:
    """Requests, tokens, cost and savings in [start, end), in total, per UTC month and per group
    (day, model or end user). Three aggregate queries whatever the volume."""
    records = UsageRecord.objects.for_tenant(tenant_id).filter(created_at__gte=start, created_at__lt=end)
    result: dict[str, Any] = {
        "start": start, "end": end, "group_by": group_by, "totals": _with_savings(records.aggregate(**SUMS)),
    }
    months = records.annotate(key=TruncMonth("created_at", tzinfo=UTC)).values("key").annotate(**SUMS).order_by("key")
    result["months"] = [_with_savings({**row, "key": _as_date(row["key"]).strftime("%Y-%m")}) for row in months]
    if group_by:
        rows = records.annotate(key=GROUPINGS[group_by]).values("key").annotate(**SUMS).order_by("key")
        result["groups"] = [
            _with_savings({**row, "key": _as_date(row["key"]).isoformat() if group_by == "day" else row["key"]})
            for row in rows
        ]
    return result


def _as_date(value: date | datetime) -> date:
    return value.date() if isinstance(value, datetime) else value


def month_savings(records: Any) -> dict[str, Any]:
    """The month's savings per lever, in total, and its list cost (the admin's usage page)."""
    row = records.aggregate(**{k: SUMS[k] for k in ("cost_usd", *(f"saved_{lever}" for lever in SAVINGS))})
    return _with_savings(row)


@dataclass
class PeriodDrift:
    period_id: int
    cap_id: int
    subject: str
    period_start: datetime
    counted_spent: Decimal
    ledger_spent: Decimal
    counted_reserved: Decimal
    held_reserved: Decimal

    @property
    def drifted(self) -> bool:
        return self.counted_spent != self.ledger_spent or self.counted_reserved != self.held_reserved


@dataclass
class Reconciliation:
    periods: list[PeriodDrift] = field(default_factory=list)

    @property
    def drift(self) -> list[PeriodDrift]:
        return [p for p in self.periods if p.drifted]


def caps_reconcile(*, tenant_id: int | None = None) -> Reconciliation:
    """Recompute every cap period's spend from the ledger (the UsageRecord of each call that
    reserved against it, or was booked through one of its leases) and its hold from the
    reservations still held (a lease's holds what it has not booked yet), and compare with the
    counters the reservations maintained."""
    reservations = Reservation.objects.all()
    periods = CapPeriod.objects.all()
    records = UsageRecord.objects.exclude(lease_ids=[])
    if tenant_id is not None:
        reservations = reservations.filter(tenant_id=tenant_id)
        periods = periods.filter(tenant_id=tenant_id)
        records = records.filter(tenant_id=tenant_id)
    rows = list(reservations.values_list("id", "call_id", "period_ids", "status", "amount_usd"))
    cost_by_call = dict(
        UsageRecord.objects.filter(call_id__in=[r[1] for r in rows]).values_list("call_id", "cost_usd")
    )
    ledger: dict[int, Decimal] = defaultdict(Decimal)
    held: dict[int, Decimal] = defaultdict(Decimal)
    for _, call_id, period_ids, status, amount in rows:
        for period_id in period_ids:
            if status == Reservation.Status.HELD:
                held[period_id] += amount
            else:
                ledger[period_id] += cost_by_call.get(call_id, Decimal(0))
    # A call admitted against leases (or a line of a batch) has no Reservation of its own: its
    # record names the lease (the batch's hold).
    lease_periods = {str(r[0]): r[2] for r in rows if r[1].startswith((LEASE_CALL_PREFIX, BATCH_CALL_PREFIX))}
    for lease_ids, cost in records.values_list("lease_ids", "cost_usd"):
        for lease_id in lease_ids:
            for period_id in lease_periods.get(lease_id, ()):
                ledger[period_id] += cost
    report = Reconciliation()
    for period in periods.order_by("id"):
        report.periods.append(
            PeriodDrift(
                period_id=period.pk,
                cap_id=period.cap_id,
                subject=period.subject,
                period_start=period.period_start,
                counted_spent=period.spent_usd,
                ledger_spent=ledger[period.pk],
                counted_reserved=period.reserved_usd,
                held_reserved=held[period.pk],
            )
        )
    return report


# The ledger rows that make a chat message's usage, as its turn's message.completed counted them
# (moderation calls on the message are the tenant's cost, not the answer's).
MESSAGE_KINDS = (UsageRecord.Kind.CHAT, UsageRecord.Kind.CACHED)
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens")


def message_usage(*, tenant_id: int, conversation_id: Any, message_ids: list[Any]) -> dict[Any, dict[str, Any]]:
    """Per message id: `{"usage": {prompt_tokens, completion_tokens, cached_tokens}, "cost_usd"}`
    summed over its calls (a tool round's call is on the message that made it). One query."""
    if not message_ids:
        return {}
    rows = (
        UsageRecord.objects.for_tenant(tenant_id)
        .filter(conversation_id=conversation_id, message_id__in=message_ids, kind__in=MESSAGE_KINDS)
        .values("message_id").annotate(cost=Sum("cost_usd"), **{key: Sum(key) for key in USAGE_KEYS})
    )
    return {
        row["message_id"]: {"usage": {key: row[key] for key in USAGE_KEYS}, "cost_usd": money_str(row["cost"] or Decimal(0))}
        for row in rows
    }
