"""Spending-cap leases: budget a web process holds in advance, so a call admitted against a cap
needs no database round trip before its first token.

A per-call reservation is a durable write on the cap's row before every upstream call — about
half a millisecond on an idle machine and several under load, all of it in front of the first
token. A lease is the same reservation made once for many calls: the process holds
min(`CAP_LEASE_MAX_USD`, headroom / `CAP_LEASE_SHARE`) of the cap's current period as one
Reservation row (`lease_take`) and admits calls against it in memory, each for its worst
case, all or nothing across the caps a call draws on. After the call, its actual cost moves from
the lease's hold to the period's spend (`lease_book`) and the difference comes back to the
lease. The hard cap holds as before: what is admitted in memory was held in the database first.

Bounds:
- A lease lives `CAP_LEASE_SECONDS`, then admits nothing more and is released (`lease_release`)
  once its last call is booked; a configuration change of the tenant closes its leases at once.
- Headroom / share: near the cap, leases shrink, and a call whose worst case no lease can cover
  takes the exact per-call reservation — which, refused, first gives back this process's idle
  leases of those caps and tries once more, so budget parked here never refuses a call alone.
- A process that exits gives its leases back (`leases_release_all_now`, at exit); one killed
  outright leaves them held until the process sweep (billing/processes.py: a lease carries its
  process's id) books its calls in flight and releases the remainder, within
  GENERATION_STALE_SECONDS and a sweep — at most `CAP_LEASE_MAX_USD` and 1/`CAP_LEASE_SHARE`
  of the headroom per cap and process is parked meanwhile (the calls booked through it are
  already spent).

Leases live on one event loop (the web process's): no locks but one per cap period, held while
a lease is being taken so concurrent calls share one.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone as dj_timezone

from streaming import outages

from .caps import Subject, alerts_if_crossed, alerts_record, cap_periods, period_bounds
from .models import CapPeriod, Reservation, SpendingCap

# --- in the database (synchronous: run through a hop) -------------------------------------

LEASE_CALL_PREFIX = "lease-"


@dataclass(frozen=True)
class LeaseGrant:
    reservation_id: uuid.UUID
    period_id: int
    amount: Decimal
    period_end: datetime | None


def lease_take(
    *, subject: Subject, cap: SpendingCap, key: str, at_least: Decimal, most: Decimal, share: int,
    process_id: uuid.UUID | None = None,
) -> LeaseGrant | None:
    """Hold min(`most`, headroom / `share`) of the cap's current period as one Reservation,
    or nothing (None) when that is less than `at_least`. The conditional UPDATE makes it
    safe against every concurrent hold, lease and settlement."""
    [(cap, period_id, end)] = cap_periods(subject, [(cap, key)], dj_timezone.now())
    with transaction.atomic():
        period = CapPeriod.objects.filter(pk=period_id).values("limit_usd", "spent_usd", "reserved_usd").first()
        if period is None:
            return None
        headroom = period["limit_usd"] - period["spent_usd"] - period["reserved_usd"]
        amount = min(most, headroom / share).quantize(Decimal("0.0000000001"), rounding=ROUND_DOWN)
        if amount < at_least or amount <= 0:
            return None
        held = CapPeriod.objects.filter(
            pk=period_id, limit_usd__gte=F("spent_usd") + F("reserved_usd") + amount
        ).update(reserved_usd=F("reserved_usd") + amount)
        if not held:
            return None  # a concurrent hold took the headroom meanwhile
        reservation = Reservation.objects.create(
            call_id=f"{LEASE_CALL_PREFIX}{uuid.uuid4()}", tenant_id=subject.tenant_id, amount_usd=amount,
            period_ids=[period_id], process_id=process_id,
        )
    return LeaseGrant(reservation_id=reservation.pk, period_id=period_id, amount=amount, period_end=end)


# One statement on PostgreSQL, as `_SETTLE_ONE`: the lease shrinks by the call's cost when it
# is still held, and the period books it either way.
_BOOK_LEASED = """
WITH claimed AS (
    UPDATE {reservation} SET amount_usd = amount_usd - %(actual)s
    WHERE id = %(id)s AND status = %(held)s
    RETURNING id
)
UPDATE {period} AS p SET spent_usd = p.spent_usd + %(actual)s,
    reserved_usd = p.reserved_usd - CASE WHEN EXISTS (SELECT 1 FROM claimed) THEN %(actual)s ELSE 0 END
WHERE p.id = %(period_id)s
RETURNING p.spent_usd, p.limit_usd, (SELECT alert_thresholds FROM {cap} WHERE id = p.cap_id)
"""


def lease_book(*, reservation_id: uuid.UUID, period_id: int, actual: Decimal) -> None:
    """Book one leased call's actual cost: moved from the lease's hold to the period's spend.
    Should the lease be gone (released, or expired by the sweep), the spend is still booked."""
    if connection.vendor == "postgresql":
        sql = _BOOK_LEASED.format(
            reservation=Reservation._meta.db_table, period=CapPeriod._meta.db_table, cap=SpendingCap._meta.db_table
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, {
                "actual": actual, "id": reservation_id, "held": Reservation.Status.HELD, "period_id": period_id,
            })
            row = cursor.fetchone()
        if row is not None:
            alerts_if_crossed(period_id, *row)
        return
    with transaction.atomic():
        claimed = Reservation.objects.filter(pk=reservation_id, status=Reservation.Status.HELD).update(
            amount_usd=F("amount_usd") - actual
        )
        CapPeriod.objects.filter(pk=period_id).update(
            spent_usd=F("spent_usd") + actual,
            reserved_usd=F("reserved_usd") - (actual if claimed else Decimal(0)),
        )
        alerts_record(period_ids=[period_id])


def lease_release(*, reservation_id: uuid.UUID, period_id: int) -> None:
    """Give back what is left of a lease. Idempotent."""
    with transaction.atomic():
        left = (
            Reservation.objects.select_for_update()
            .filter(pk=reservation_id, status=Reservation.Status.HELD)
            .values_list("amount_usd", flat=True)
            .first()
        )
        if left is None:
            return
        Reservation.objects.filter(pk=reservation_id).update(
            status=Reservation.Status.SETTLED, actual_usd=Decimal(0), settled_at=dj_timezone.now()
        )
        CapPeriod.objects.filter(pk=period_id).update(reserved_usd=F("reserved_usd") - left)


# --- on the event loop --------------------------------------------------------------------

logger = logging.getLogger(__name__)

Hop = Callable[..., Awaitable[Any]]
Ident = tuple[int, str, datetime]  # (cap id, subject key, period start)


@dataclass(eq=False)
class Lease:
    ident: Ident
    tenant_id: int
    reservation_id: uuid.UUID
    period_id: int
    available: Decimal
    closes_at: float  # monotonic
    outstanding: int = 0  # calls admitted and not yet booked
    closed: bool = False
    released: bool = False

    def usable(self, amount: Decimal, now: float) -> bool:
        return not self.closed and now < self.closes_at and self.available >= amount


@dataclass(frozen=True)
class Draw:
    """What one call took from its leases: returned, less its cost, when it is booked."""

    leases: tuple[Lease, ...]
    amount: Decimal


def leasable(caps: list[tuple[SpendingCap, str]]) -> bool:
    """Tenant and API-key caps are leased; a per-end-user cap (one counter per end user, each
    seeing few calls) is reserved per call."""
    return bool(caps) and all(cap.scope != SpendingCap.Scope.END_USER for cap, _ in caps)


@dataclass
class Leases:
    """The leases of one event loop."""

    by_ident: dict[Ident, Lease] = field(default_factory=dict)  # the ones calls draw on
    held: set[Lease] = field(default_factory=set)  # every lease not given back yet
    locks: dict[Ident, asyncio.Lock] = field(default_factory=dict)
    background: set[asyncio.Task[Any]] = field(default_factory=set)

    async def draw(
        self, *, subject: Subject, caps: list[tuple[SpendingCap, str]], amount: Decimal, hop: Hop,
        process_id: uuid.UUID | None = None,
    ) -> Draw | None:
        """Admit `amount` against a lease of every cap, taking leases as needed; None when
        some cap has too little headroom for a lease (the caller reserves exactly). A lease
        taken here carries `process_id` (billing/processes.py)."""
        if not leasable(caps) or settings.CAP_LEASE_SECONDS <= 0:
            return None
        now_wall = _wall_now()
        wanted = [((cap.pk, key, period_bounds(cap.period, now_wall)[0]), cap, key) for cap, key in caps]
        for ident, cap, key in wanted:
            if not self._usable(ident, amount) and not await self._take(ident, subject, cap, key, amount, hop, process_id):
                return None
        # No await from here on: the check and the deduction are one step on this loop.
        found = [self.by_ident.get(ident) for ident, _, _ in wanted]
        now = time.monotonic()
        leases = tuple(lease for lease in found if lease is not None and lease.usable(amount, now))
        if len(leases) != len(wanted):
            return None  # closed or drawn down while another was taken: reserve exactly this once
        for lease in leases:
            lease.available -= amount
            lease.outstanding += 1
        return Draw(leases=leases, amount=amount)

    def _usable(self, ident: Ident, amount: Decimal) -> bool:
        lease = self.by_ident.get(ident)
        return lease is not None and lease.usable(amount, time.monotonic())

    async def _take(
        self, ident: Ident, subject: Subject, cap: SpendingCap, key: str, amount: Decimal, hop: Hop,
        process_id: uuid.UUID | None,
    ) -> bool:
        lock = self.locks.setdefault(ident, asyncio.Lock())
        async with lock:
            if self._usable(ident, amount):
                return True  # another call took one while this one waited
            old = self.by_ident.pop(ident, None)
            if old is not None:
                self._close(old, hop)
            grant = await hop(
                lease_take, subject=subject, cap=cap, key=key, at_least=amount,
                most=Decimal(str(settings.CAP_LEASE_MAX_USD)), share=settings.CAP_LEASE_SHARE, process_id=process_id,
            )
            if grant is None:
                return False
            lease = Lease(
                ident=ident, tenant_id=subject.tenant_id, reservation_id=grant.reservation_id,
                period_id=grant.period_id, available=grant.amount,
                closes_at=time.monotonic() + settings.CAP_LEASE_SECONDS,
            )
            self.by_ident[ident] = lease
            self.held.add(lease)
            _release_at_exit_once()
            asyncio.get_running_loop().call_later(settings.CAP_LEASE_SECONDS, self._close, lease, hop)
            return True

    def settled(self, draw: Draw, *, actual: Decimal | None, hop: Hop) -> None:
        """The call is over and its cost booked through each lease (`lease_book`, with the
        UsageRecord): return the rest of its worst case. `actual` None — the booking failed —
        returns nothing: the worst case stays held until the lease is released."""
        for lease in draw.leases:
            lease.outstanding -= 1
            if actual is not None:
                lease.available += draw.amount - actual
            if lease.closed and lease.outstanding == 0:
                self._release(lease, hop)

    def close_tenant(self, tenant_id: int, hop: Hop) -> None:
        """The tenant's configuration changed (a cap edited, deleted…): its leases admit no more."""
        for ident, lease in list(self.by_ident.items()):
            if lease.tenant_id == tenant_id:
                del self.by_ident[ident]
                self._close(lease, hop)

    async def release_idle(self, caps: list[tuple[SpendingCap, str]], hop: Hop) -> bool:
        """Give back this process's idle leases of these caps now; True when there were any."""
        now_wall = _wall_now()
        released = False
        for cap, key in caps:
            ident = (cap.pk, key, period_bounds(cap.period, now_wall)[0])
            lease = self.by_ident.get(ident)
            if lease is not None and lease.outstanding == 0:
                del self.by_ident[ident]
                lease.closed = lease.released = True
                self.held.discard(lease)
                await hop(lease_release, reservation_id=lease.reservation_id, period_id=lease.period_id)
                released = True
        return released

    def _close(self, lease: Lease, hop: Hop) -> None:
        lease.closed = True
        if self.by_ident.get(lease.ident) is lease:
            del self.by_ident[lease.ident]
        if lease.outstanding == 0:
            self._release(lease, hop)

    def _release(self, lease: Lease, hop: Hop) -> None:
        if lease.released:
            return
        lease.released = True
        self.held.discard(lease)
        # Retried while PostgreSQL is away (DEPENDENCY_RETRY_SECONDS): a restart delays giving
        # the lease back; it must not leave the cap's headroom held for the process's life.
        release = functools.partial(hop, lease_release, reservation_id=lease.reservation_id, period_id=lease.period_id)
        task = asyncio.ensure_future(outages.outlast(release, what=f"giving back cap lease {lease.reservation_id}"))
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        task.add_done_callback(_release_failed_logged)

    async def release_all(self, hop: Hop) -> None:
        """Close every lease and wait for the idle ones to be given back (shutdown, tests)."""
        for lease in list(self.by_ident.values()):
            self._close(lease, hop)
        if self.background:
            await asyncio.gather(*self.background, return_exceptions=True)


def _release_failed_logged(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("a cap lease was not given back (held until this process's leases are swept)",
                       exc_info=task.exception())


def _wall_now() -> datetime:
    return dj_timezone.now()


_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Leases] = weakref.WeakKeyDictionary()


def leases() -> Leases:
    """This event loop's leases."""
    loop = asyncio.get_running_loop()
    found = _per_loop.get(loop)
    if found is None:
        found = _per_loop[loop] = Leases()
    return found


def leases_forget() -> None:
    """Drop every loop's leases without releasing them (tests: the database was flushed)."""
    for registry in list(_per_loop.values()):
        registry.by_ident.clear()
        registry.held.clear()


def leases_release_all_now() -> int:
    """Give back every lease of this process, synchronously: at exit, when the loop is gone and
    the streams drawing on them with it. A process killed outright leaves its leases to the
    process sweep (billing/processes.py)."""
    released = 0
    for registry in list(_per_loop.values()):
        for lease in list(registry.held):
            lease.closed = lease.released = True
            registry.held.discard(lease)
            registry.by_ident.pop(lease.ident, None)
            try:
                lease_release(reservation_id=lease.reservation_id, period_id=lease.period_id)
                released += 1
            except Exception:  # noqa: BLE001 — exiting: the sweep will release it
                logger.exception("could not give back cap lease %s at exit", lease.reservation_id)
    return released


_exit_hook_registered = False


def _release_at_exit_once() -> None:
    global _exit_hook_registered
    if not _exit_hook_registered:
        _exit_hook_registered = True
        atexit.register(leases_release_all_now)
