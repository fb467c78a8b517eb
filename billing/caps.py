"""Spending caps by reservation: reserve the worst case before a call, settle to the actual after.

The guarantee lives in the database: a reservation is one conditional UPDATE per applicable cap
period (`spent + reserved + amount <= limit`), all in the caller's transaction, rows locked in
id order so concurrent reservations never deadlock. PostgreSQL re-checks the condition against
the committed row after waiting for its lock, so no interleaving admits more than the limit;
SQLite serialises writers outright. Periods are derived from the clock: a new period is a new
row starting at zero.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from cachetools import LRUCache
from django.db import connection, transaction
from django.db.models import F, Q
from django.db.models.signals import post_delete
from django.utils import timezone as dj_timezone

from tenants.callers import Caller

from .alerts import alerts_if_crossed, alerts_record
from .models import CapPeriod, Reservation, SpendingCap

LIFETIME_START = datetime(2000, 1, 1, tzinfo=UTC)


class CapExceeded(Exception):
    """A call would exceed a hard cap. Carries which cap, what remains and when it resets."""

    def __init__(self, *, cap: SpendingCap, remaining: Decimal, resets_at: datetime | None) -> None:
        self.cap_id = cap.pk
        self.scope = cap.scope
        self.period = cap.period
        self.limit = cap.limit_usd
        self.remaining = max(remaining, Decimal(0))
        self.resets_at = resets_at
        when = f", resets {resets_at.isoformat().replace('+00:00', 'Z')}" if resets_at else ""
        super().__init__(
            f"{cap.scope} {cap.period} spending cap of ${cap.limit_usd.normalize():f} reached: "
            f"${self.remaining.quantize(Decimal('0.0001'))} remains{when}"
        )

    @property
    def retry_after(self) -> float | None:
        if self.resets_at is None:
            return None
        return max(0.0, (self.resets_at - dj_timezone.now()).total_seconds())


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime | None]:
    """[start, end) of the UTC calendar period containing `now`; lifetime never ends."""
    now = now.astimezone(UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == SpendingCap.Period.DAY:
        return day, day + timedelta(days=1)
    if period == SpendingCap.Period.WEEK:
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == SpendingCap.Period.MONTH:
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
        return start, end
    return LIFETIME_START, None


# Who a call is for: the caps of the tenant, this end user and this key apply.
Subject = Caller


def caps_applicable(caps: Iterable[SpendingCap], subject: Subject) -> list[tuple[SpendingCap, str]]:
    """Of a tenant's caps (in id order), those that apply to `subject`, with the subject key of
    their counter. A per-end-user or per-key cap with no specific end user / key applies to
    each one separately."""
    result = []
    for cap in caps:
        if cap.scope == SpendingCap.Scope.TENANT:
            result.append((cap, ""))
        elif cap.scope == SpendingCap.Scope.END_USER and subject.end_user_id is not None:
            if cap.end_user_id is None or cap.end_user_id == subject.end_user_id:
                result.append((cap, f"u:{subject.end_user_id}"))
        elif cap.scope == SpendingCap.Scope.API_KEY and subject.api_key_id is not None:
            if cap.api_key_id is None or cap.api_key_id == subject.api_key_id:
                result.append((cap, f"k:{subject.api_key_id}"))
    return result


def caps_for(subject: Subject) -> list[tuple[SpendingCap, str]]:
    """Applicable caps with the subject key of their counter (one query: a tenant has few)."""
    return caps_applicable(SpendingCap.objects.for_tenant(subject.tenant_id).order_by("id"), subject)


# (cap id, subject key, period start) → (CapPeriod id, the limit it was synced to). A period's
# row never changes identity, so once found it is not looked up again; a cap whose limit
# differs from the synced one is looked up (and synced) afresh. Deleting a cap clears it all
# (signal below): SQLite may hand a deleted row's id to the next row.
_known_periods: LRUCache = LRUCache(maxsize=100_000)
_known_lock = threading.Lock()


def known_periods_clear() -> None:
    with _known_lock:
        _known_periods.clear()


def cap_periods(
    subject: Subject, caps: list[tuple[SpendingCap, str]], now: datetime
) -> list[tuple[SpendingCap, int, datetime | None]]:
    """(cap, CapPeriod id, period end) of each cap, in CapPeriod id order (the lock order);
    creates the rows of a new period and syncs a period's limit to its cap's."""
    wanted = {}
    for cap, key in caps:
        start, end = period_bounds(cap.period, now)
        wanted[(cap.pk, key, start)] = (cap, end)
    with _known_lock:
        known = {ident: _known_periods.get(ident) for ident in wanted}
    missing = [ident for ident, hit in known.items() if hit is None or hit[1] != wanted[ident][0].limit_usd]
    if missing:
        found = _periods_load(subject, {i: wanted[i] for i in missing})
        known.update(found)
        # A row this transaction created (or a limit it synced) holds for others only once it
        # commits — it may roll back — so it is remembered then.
        transaction.on_commit(lambda: _remember(found))
    return sorted(
        ((cap, known[ident][0], end) for ident, (cap, end) in wanted.items()),  # type: ignore[index]
        key=lambda item: item[1],
    )


def _remember(periods: dict[tuple[int, str, datetime], tuple[int, Decimal]]) -> None:
    with _known_lock:
        _known_periods.update(periods)


def _periods_load(
    subject: Subject, wanted: dict[tuple[int, str, datetime], tuple[SpendingCap, datetime | None]]
) -> dict[tuple[int, str, datetime], tuple[int, Decimal]]:
    query = Q()
    for cap_id, key, start in wanted:
        query |= Q(cap_id=cap_id, subject=key, period_start=start)
    rows = {(p.cap_id, p.subject, p.period_start): p for p in CapPeriod.objects.filter(query)}
    absent = [
        CapPeriod(cap=cap, tenant_id=subject.tenant_id, subject=key, period_start=start, limit_usd=cap.limit_usd)
        for (cap_id, key, start), (cap, _) in wanted.items()
        if (cap_id, key, start) not in rows
    ]
    if absent:  # the first call of a period; a concurrent first call may win the insert
        CapPeriod.objects.bulk_create(absent, ignore_conflicts=True)
        rows = {(p.cap_id, p.subject, p.period_start): p for p in CapPeriod.objects.filter(query)}
    found = {}
    for ident, (cap, _) in wanted.items():
        period = rows[ident]
        if period.limit_usd != cap.limit_usd:
            CapPeriod.objects.filter(pk=period.pk).update(limit_usd=cap.limit_usd)
        found[ident] = (period.pk, cap.limit_usd)
    return found


def cap_reserve(*, subject: Subject, amount: Decimal, call_id: str) -> Reservation:
    """Hold `amount` against every applicable cap, all or nothing. Raises CapExceeded."""
    return cap_hold(subject=subject, caps=caps_for(subject), amount=amount, call_id=call_id)


def cap_hold(
    *, subject: Subject, caps: list[tuple[SpendingCap, str]], amount: Decimal, call_id: str,
    process_id: uuid.UUID | None = None,
) -> Reservation:
    """`cap_reserve` with the applicable caps already known (a caller that caches them).
    With no cap to hold against, nothing is written: the reservation returned holds nothing
    and settling it is free. Otherwise one conditional UPDATE per cap period, in id order, and
    the Reservation row, in one transaction. `process_id`: the web process (`/v1`) the hold is
    for, whose death settles it (billing/processes.py)."""
    if not caps:
        return Reservation(call_id=call_id, tenant_id=subject.tenant_id, amount_usd=amount, period_ids=[])
    now = dj_timezone.now()
    return _hold(
        subject=subject, periods=cap_periods(subject, caps, now), amount=amount, call_id=call_id, process_id=process_id
    )


def _hold(
    *, subject: Subject, periods: list[tuple[SpendingCap, int, datetime | None]], amount: Decimal, call_id: str,
    process_id: uuid.UUID | None,
) -> Reservation:
    if connection.vendor == "postgresql" and len(periods) == 1:
        return _hold_one(subject=subject, period=periods[0], amount=amount, call_id=call_id, process_id=process_id)
    table = CapPeriod._meta.db_table
    hold = (
        f"UPDATE {table} SET reserved_usd = reserved_usd + %s "
        f"WHERE id = %s AND limit_usd >= spent_usd + reserved_usd + %s"
    )
    # No savepoint: a refusal must roll back the caller's whole transaction anyway.
    with transaction.atomic(savepoint=False):
        with connection.cursor() as cursor:
            for cap, period_id, end in periods:
                cursor.execute(hold, [amount, period_id, amount])
                if cursor.rowcount != 1:
                    _refuse(cap, period_id, end)
        return Reservation.objects.create(
            call_id=call_id, tenant_id=subject.tenant_id, amount_usd=amount,
            period_ids=[period_id for _, period_id, _ in periods], process_id=process_id,
        )


# One cap (the common case) on PostgreSQL: the hold and the Reservation row in one statement —
# one round trip, atomic on its own, inside or outside the caller's transaction. The INSERT
# selects from the UPDATE's RETURNING, so a refused hold inserts nothing.
_HOLD_ONE = """
WITH held AS (
    UPDATE {period} SET reserved_usd = reserved_usd + %(amount)s
    WHERE id = %(period_id)s AND limit_usd >= spent_usd + reserved_usd + %(amount)s
    RETURNING id
)
INSERT INTO {reservation} (id, call_id, tenant_id, amount_usd, period_ids, status, created_at, process_id)
SELECT %(id)s, %(call_id)s, %(tenant_id)s, %(amount)s, %(period_ids)s::jsonb, %(status)s, now(), %(process_id)s
FROM held
RETURNING created_at
"""


def _hold_one(
    *, subject: Subject, period: tuple[SpendingCap, int, datetime | None], amount: Decimal, call_id: str,
    process_id: uuid.UUID | None,
) -> Reservation:
    cap, period_id, end = period
    reservation = Reservation(
        id=uuid.uuid4(), call_id=call_id, tenant_id=subject.tenant_id, amount_usd=amount, period_ids=[period_id],
        status=Reservation.Status.HELD, process_id=process_id,
    )
    sql = _HOLD_ONE.format(period=CapPeriod._meta.db_table, reservation=Reservation._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(sql, {
            "amount": amount, "period_id": period_id, "id": reservation.id, "call_id": call_id,
            "tenant_id": subject.tenant_id, "period_ids": f"[{period_id}]", "status": reservation.status,
            "process_id": process_id,
        })
        row = cursor.fetchone()
    if row is None:
        _refuse(cap, period_id, end)
    reservation.created_at = row[0]
    reservation._state.adding = False  # it is stored: a later save() updates, never inserts twice
    return reservation


def _refuse(cap: SpendingCap, period_id: int, end: datetime | None) -> None:
    period = CapPeriod.objects.filter(pk=period_id).first()
    if period is None:  # not reachable while deleting a cap clears the ids
        known_periods_clear()
        raise RuntimeError(f"cap period {period_id} vanished; the next call looks again")
    remaining = cap.limit_usd - period.spent_usd - period.reserved_usd
    raise CapExceeded(cap=cap, remaining=remaining, resets_at=end)


# The settlement of a one-cap reservation on PostgreSQL: claim it and book it in one statement,
# so the cap's row is locked for one statement, not for a transaction of several.
_SETTLE_ONE = """
WITH claimed AS (
    UPDATE {reservation} SET status = %(settled)s, actual_usd = %(actual)s, settled_at = now()
    WHERE id = %(id)s AND status = %(held)s
    RETURNING amount_usd
)
UPDATE {period} AS p SET reserved_usd = p.reserved_usd - claimed.amount_usd, spent_usd = p.spent_usd + %(actual)s
FROM claimed WHERE p.id = %(period_id)s
RETURNING p.spent_usd, p.limit_usd, (SELECT alert_thresholds FROM {cap} WHERE id = p.cap_id)
"""


def _settle_one(*, reservation: Reservation, actual: Decimal) -> bool:
    [period_id] = reservation.period_ids
    sql = _SETTLE_ONE.format(
        reservation=Reservation._meta.db_table, period=CapPeriod._meta.db_table, cap=SpendingCap._meta.db_table
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, {
            "settled": Reservation.Status.SETTLED, "held": Reservation.Status.HELD, "actual": actual,
            "id": reservation.pk, "period_id": period_id,
        })
        row = cursor.fetchone()
    if row is None:
        return False
    alerts_if_crossed(period_id, *row)
    return True


def cap_settle(*, reservation: Reservation, actual: Decimal) -> bool:
    """Release the hold and book the actual cost, once. Returns False when already settled.
    Best right after the UsageRecord is written; should the process die in between, the
    stale-reservation sweep settles it from that record (`reservations_expire`)."""
    if not reservation.period_ids:
        return True  # it held nothing and was never stored
    if connection.vendor == "postgresql" and len(reservation.period_ids) == 1:
        return _settle_one(reservation=reservation, actual=actual)
    with transaction.atomic(savepoint=False):
        claimed = Reservation.objects.filter(pk=reservation.pk, status=Reservation.Status.HELD).update(
            status=Reservation.Status.SETTLED, actual_usd=actual, settled_at=dj_timezone.now()
        )
        if not claimed:
            return False
        if reservation.period_ids:
            CapPeriod.objects.filter(pk__in=sorted(reservation.period_ids)).update(
                reserved_usd=F("reserved_usd") - reservation.amount_usd,
                spent_usd=F("spent_usd") + actual,
            )
            alerts_record(period_ids=reservation.period_ids)
    return True


def reservations_expire(*, older_than: timedelta) -> int:
    """Settle reservations a crashed process left held: from their usage record when one was
    written (the call happened), otherwise at zero (it never completed)."""
    from .models import BATCH_CALL_PREFIX, UsageRecord

    cutoff = dj_timezone.now() - older_than
    count = 0
    stale = Reservation.objects.filter(status=Reservation.Status.HELD, created_at__lt=cutoff)
    # A batch's hold lives as long as the batch (up to its window); the batch's end settles it.
    for reservation in stale.exclude(call_id__startswith=BATCH_CALL_PREFIX):
        record = UsageRecord.objects.filter(call_id=reservation.call_id).first()
        actual = record.cost_usd if record else Decimal(0)
        with transaction.atomic():
            if cap_settle(reservation=reservation, actual=actual):
                Reservation.objects.filter(pk=reservation.pk).update(status=Reservation.Status.EXPIRED)
                count += 1
    return count


def _cap_deleted(sender: type, **kwargs: object) -> None:
    known_periods_clear()


post_delete.connect(_cap_deleted, sender=SpendingCap, dispatch_uid="caps-known-periods")
