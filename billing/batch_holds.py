"""The Batch API's money: one hold for the whole batch, one ledger row per line.

A batch's hold works like a cap lease that spans every applicable cap: each line's cost moves
from the hold to the spend as the line is booked (its record names the hold in `lease_ids`,
which is how `reconcile_caps` finds it), and what is left goes back when the batch ends. Its
call id starts with BATCH_CALL_PREFIX: the stale-reservation sweep leaves it alone (a batch
runs for up to its window); the batch's own expiry settles it. Rows are written by
`services.usage_record_created`, the one ledger write of every call.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.db import transaction
from django.db.models import F, Sum
from django.utils import timezone as dj_timezone

from llm.gateway import Usage

from .alerts import alerts_record
from .caps import Subject, cap_reserve
from .models import BATCH_CALL_PREFIX, CapPeriod, Reservation, UsageRecord
from .services import Price, UsageInput, usage_record_created


def batch_call_id(batch_id: uuid.UUID) -> str:
    return f"{BATCH_CALL_PREFIX}{batch_id.hex}"


def batch_hold(*, subject: Subject, batch_id: uuid.UUID, amount: Decimal) -> uuid.UUID | None:
    """Reserve a whole batch's worst case (every line's, at the price it will be charged)
    against every cap that applies, all or nothing. Raises CapExceeded. None: no cap applies."""
    reservation = cap_reserve(subject=subject, amount=amount, call_id=batch_call_id(batch_id))
    return reservation.pk if reservation.period_ids else None


def batch_hold_grow(*, reservation_id: uuid.UUID, amount: Decimal) -> bool:
    """Hold `amount` more for the batch on every cap its hold is on, all or nothing (a batch
    that Parley runs itself is charged the normal price, not the batch price it was held at).
    False: a cap refused it, and the hold is as it was."""
    with transaction.atomic():
        period_ids = Reservation.objects.select_for_update().filter(
            pk=reservation_id, status=Reservation.Status.HELD).values_list("period_ids", flat=True).first()
        if period_ids is None:
            return False
        for period_id in sorted(period_ids):
            # The same conditional UPDATE as every hold (billing.caps): PostgreSQL re-checks it
            # against the committed row after waiting for its lock.
            if not CapPeriod.objects.filter(
                pk=period_id, limit_usd__gte=F("spent_usd") + F("reserved_usd") + amount
            ).update(reserved_usd=F("reserved_usd") + amount):
                transaction.set_rollback(True)
                return False
        Reservation.objects.filter(pk=reservation_id).update(amount_usd=F("amount_usd") + amount)
    return True


def batch_hold_left(reservation_id: uuid.UUID | None) -> Decimal | None:
    """What the batch's hold still holds; None: unbounded (no cap applies)."""
    if reservation_id is None:
        return None
    left = Reservation.objects.filter(pk=reservation_id, status=Reservation.Status.HELD).values_list(
        "amount_usd", flat=True).first()
    return left if left is not None else Decimal(0)


def batch_line_book(
    *, batch_id: uuid.UUID, index: int, reservation_id: uuid.UUID | None, subject: Subject, model: str,
    price: Price, usage: Usage, batch_priced: bool,
) -> UsageRecord:
    """One line's ledger row (kind `batch`) at the price charged — the batch price when the
    provider ran it as a batch (`saved_batch_usd`: the normal price less that), the normal one
    when Parley ran it — and its cost moved from the batch's hold to the spend. Once: a line
    booked again (a resumed run) returns its first row and moves nothing."""
    tokens = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
              "cached_tokens": usage.cached_tokens}
    charged = price.batch() if batch_priced else price
    saved = price.cost(**tokens) - charged.cost(**tokens) if batch_priced else Decimal(0)
    with transaction.atomic():
        record, created = usage_record_created(usage=UsageInput(
            call_id=f"{batch_call_id(batch_id)}:{index}", tenant_id=subject.tenant_id, model=model,
            end_user_id=subject.end_user_id, api_key_id=subject.api_key_id, kind=UsageRecord.Kind.BATCH,
            saved_batch_usd=max(saved, Decimal(0)), lease_ids=(str(reservation_id),) if reservation_id else (),
            **tokens,
        ), price=charged)
        if created and reservation_id is not None:
            _batch_spend(reservation_id, record.cost_usd)
    return record


def _batch_spend(reservation_id: uuid.UUID, actual: Decimal) -> None:
    held = Reservation.objects.select_for_update().filter(pk=reservation_id).values_list(
        "status", "amount_usd", "period_ids").first()
    if held is None:
        return
    status, left, period_ids = held
    taken = min(actual, left) if status == Reservation.Status.HELD else Decimal(0)
    if taken:
        Reservation.objects.filter(pk=reservation_id).update(amount_usd=F("amount_usd") - taken)
    CapPeriod.objects.filter(pk__in=sorted(period_ids)).update(
        spent_usd=F("spent_usd") + actual, reserved_usd=F("reserved_usd") - taken)
    alerts_record(period_ids=period_ids)


def batch_settle(*, batch_id: uuid.UUID, reservation_id: uuid.UUID | None) -> Decimal:
    """The batch ended (completed, failed, cancelled or expired): what its hold has left goes
    back — lines never run cost nothing. Idempotent. Returns what the batch's lines cost."""
    prefix = f"{batch_call_id(batch_id)}:"
    with transaction.atomic():
        cost = UsageRecord.objects.filter(call_id__startswith=prefix).aggregate(total=Sum("cost_usd"))["total"]
        cost = cost or Decimal(0)
        if reservation_id is None:
            return cost
        held = Reservation.objects.select_for_update().filter(
            pk=reservation_id, status=Reservation.Status.HELD).values_list("amount_usd", "period_ids").first()
        if held is None:
            return cost
        left, period_ids = held
        Reservation.objects.filter(pk=reservation_id).update(
            status=Reservation.Status.SETTLED, actual_usd=cost, settled_at=dj_timezone.now())
        CapPeriod.objects.filter(pk__in=sorted(period_ids)).update(reserved_usd=F("reserved_usd") - left)
    return cost
