"""Spending-cap leases (billing/leases.py): budget held in advance per web process, drawn on in
memory, booked after each call — and the hard cap still holds."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal

import pytest
from channels.db import database_sync_to_async

from billing.caps import Subject, caps_for
from billing.leases import LEASE_CALL_PREFIX, Leases, lease_book
from billing.metering import call_hold_async
from billing.models import CapPeriod, Reservation, SpendingCap
from billing.services import Price
from tests.conftest import adb

pytestmark = pytest.mark.django_db(transaction=True)


async def hop(fn, /, **kwargs):
    return await database_sync_to_async(fn)(**kwargs)


async def _capped(tenant_factory, limit: str) -> tuple[Subject, list]:
    setup = await adb(tenant_factory)()
    await adb(SpendingCap.objects.create)(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal(limit))
    subject = Subject(setup.tenant.pk)
    return subject, await adb(caps_for)(subject)


async def _period() -> CapPeriod:
    return await adb(CapPeriod.objects.get)()


async def test_a_lease_is_held_drawn_on_and_booked(tenant_factory, settings):
    settings.CAP_LEASE_MAX_USD, settings.CAP_LEASE_SHARE = 1.0, 16
    subject, caps = await _capped(tenant_factory, "8")
    leases = Leases()

    draw = await leases.draw(subject=subject, caps=caps, amount=Decimal("0.1"), hop=hop)
    [lease] = draw.leases
    period = await _period()
    assert period.reserved_usd == Decimal("0.5")  # min($1, $8 / 16)
    assert lease.available == Decimal("0.4") and lease.outstanding == 1

    await hop(lease_book, reservation_id=lease.reservation_id, period_id=lease.period_id, actual=Decimal("0.03"))
    leases.settled(draw, actual=Decimal("0.03"), hop=hop)
    period = await _period()
    assert (period.spent_usd, period.reserved_usd) == (Decimal("0.03"), Decimal("0.47"))
    assert lease.available == Decimal("0.47") and lease.outstanding == 0
    held = await adb(Reservation.objects.get)(pk=lease.reservation_id)
    assert held.call_id.startswith(LEASE_CALL_PREFIX) and held.amount_usd == Decimal("0.47")

    # Closed (a configuration change, or its time is up) and idle: given back at once.
    leases.close_tenant(subject.tenant_id, hop)
    await leases.release_all(hop)
    period = await _period()
    assert (period.spent_usd, period.reserved_usd) == (Decimal("0.03"), 0)
    assert (await adb(Reservation.objects.get)(pk=lease.reservation_id)).status == "settled"


async def test_a_closed_lease_waits_for_its_calls_before_it_is_released(tenant_factory):
    subject, caps = await _capped(tenant_factory, "8")
    leases = Leases()
    draw = await leases.draw(subject=subject, caps=caps, amount=Decimal("0.1"), hop=hop)
    leases.close_tenant(subject.tenant_id, hop)
    await leases.release_all(hop)
    assert (await _period()).reserved_usd > 0  # the call is still streaming: its worst case stays held
    assert await leases.draw(subject=subject, caps=caps, amount=Decimal("0.1"), hop=hop) is not None  # a new lease

    [lease] = draw.leases
    await hop(lease_book, reservation_id=lease.reservation_id, period_id=lease.period_id, actual=Decimal("0.02"))
    leases.settled(draw, actual=Decimal("0.02"), hop=hop)
    await asyncio.gather(*leases.background)
    assert (await adb(Reservation.objects.get)(pk=lease.reservation_id)).status == "settled"


async def test_near_the_cap_leases_shrink_and_calls_are_reserved_exactly(tenant_factory, settings):
    settings.CAP_LEASE_MAX_USD, settings.CAP_LEASE_SHARE = 1.0, 16
    subject, caps = await _capped(tenant_factory, "1")
    leases = Leases()
    small = await leases.draw(subject=subject, caps=caps, amount=Decimal("0.01"), hop=hop)
    assert small is not None and small.leases[0].available == Decimal("0.0525")  # $1/16 − $0.01
    # $0.95 fits no lease; reserved exactly, it is refused while this process's lease is busy…
    assert await leases.draw(subject=subject, caps=caps, amount=Decimal("0.95"), hop=hop) is None
    leases.settled(small, actual=Decimal(0), hop=hop)  # (booked at zero)
    # …and admitted once the idle lease is given back first: parked budget refuses no call.
    hold = await _with(leases, _hold(subject=subject, caps=caps, amount=Decimal("0.95"), call_id="big"))
    assert hold.draw is None and hold.reservation.amount_usd == Decimal("0.95")
    assert (await _period()).reserved_usd == Decimal("0.95")


# A cent per output token and free input: a hold of `amount` is amount × 100 tokens of output.
CENT_A_TOKEN = Price(model="m", input=Decimal(0), cached_input=Decimal(0), output=Decimal(10_000), context_window=0)


def _hold(*, subject, caps, amount: Decimal, call_id: str):
    """billing.metering's hold of exactly `amount` on this loop's leases (or exactly reserved)."""
    return call_hold_async(
        subject=subject, caps=caps, price=CENT_A_TOKEN, model="m", prompt_tokens=0, max_tokens=int(amount * 100),
        call_id=call_id, hop=hop,
    )


async def _with(leases: Leases, call):
    """Run a completions-level call with `leases` as this loop's leases."""
    from billing import leases as module

    loop = asyncio.get_running_loop()
    previous = module._per_loop.get(loop)
    module._per_loop[loop] = leases
    try:
        return await call
    finally:
        if previous is not None:
            module._per_loop[loop] = previous


async def test_two_processes_drawing_at_once_never_pass_the_cap(tenant_factory, settings):
    """Two web processes' worth of leases (two registries), sixty concurrent calls of random
    cost against a cap that covers about half of them: spend never passes the limit, at any
    moment nothing is held beyond it, and every admitted call is booked."""
    settings.CAP_LEASE_MAX_USD, settings.CAP_LEASE_SHARE, settings.CAP_LEASE_SECONDS = 0.5, 4, 0.3
    limit = Decimal("3")
    subject, caps = await _capped(tenant_factory, str(limit))
    processes = [Leases(), Leases()]
    rng = random.Random(7)
    admitted: list[Decimal] = []
    paths: list[str] = []
    refused = 0

    async def call(n: int) -> None:
        nonlocal refused
        leases = processes[n % 2]
        worst = Decimal(rng.randint(5, 15)) / 100
        try:
            hold = await _with(leases, _hold(subject=subject, caps=caps, amount=worst, call_id=f"c{n}"))
            reservation, draw = hold.reservation, hold.draw
        except Exception as error:  # CapExceeded
            assert type(error).__name__ == "CapExceeded"
            refused += 1
            return
        period = await _period()
        assert period.spent_usd + period.reserved_usd <= limit
        paths.append("leased" if draw is not None else "exact")
        await asyncio.sleep(rng.random() / 20)
        # Half the calls cost their whole worst case: any over-admission would show as overspend.
        actual = worst if n % 2 == 0 else (worst * Decimal(rng.randint(30, 100)) / 100).quantize(Decimal("0.0001"))
        admitted.append(actual)
        if draw is not None:
            [lease] = draw.leases
            await hop(lease_book, reservation_id=lease.reservation_id, period_id=lease.period_id, actual=actual)
            leases.settled(draw, actual=actual, hop=hop)
        else:
            from billing.caps import cap_settle

            await hop(cap_settle, reservation=reservation, actual=actual)

    await asyncio.gather(*(call(n) for n in range(60)))
    for leases in processes:
        await leases.release_all(hop)
    period = await _period()
    assert refused and {"leased", "exact"} <= set(paths)  # both paths ran, and some calls were refused
    assert period.spent_usd == sum(admitted) <= limit
    assert period.reserved_usd == 0


async def test_a_booking_through_a_lease_records_the_threshold_it_crosses(tenant_factory, settings):
    from billing.models import CapAlert

    settings.CAP_LEASE_MAX_USD, settings.CAP_LEASE_SHARE = 5.0, 1
    subject, caps = await _capped(tenant_factory, "8")
    await adb(SpendingCap.objects.update)(alert_thresholds=[50, 80])
    caps = await adb(caps_for)(subject)
    leases = Leases()
    draw = await leases.draw(subject=subject, caps=caps, amount=Decimal("4.5"), hop=hop)
    [lease] = draw.leases
    await hop(lease_book, reservation_id=lease.reservation_id, period_id=lease.period_id, actual=Decimal("3.9"))
    assert not await adb(CapAlert.objects.exists)()  # 48.75%
    draw = await leases.draw(subject=subject, caps=caps, amount=Decimal("0.5"), hop=hop)
    await hop(lease_book, reservation_id=lease.reservation_id, period_id=lease.period_id, actual=Decimal("0.2"))
    assert await adb(lambda: list(CapAlert.objects.values_list("threshold", flat=True)))() == [50]


async def test_leases_are_given_back_when_the_process_exits(tenant_factory):
    from billing.leases import leases, leases_release_all_now

    subject, caps = await _capped(tenant_factory, "8")
    draw = await leases().draw(subject=subject, caps=caps, amount=Decimal("0.1"), hop=hop)
    assert draw is not None and (await _period()).reserved_usd > 0
    assert await adb(leases_release_all_now)() == 1  # what atexit runs, streams or not
    assert (await _period()).reserved_usd == 0
    assert await adb(leases_release_all_now)() == 0


async def test_a_lease_release_that_meets_a_database_restart_is_retried(tenant_factory, settings):
    """Giving a lease back while PostgreSQL restarts: the first tries fail, a later one lands,
    and the cap's headroom comes back (it stayed held for the process's life before)."""
    from django.db import OperationalError

    settings.DEPENDENCY_RETRY_SECONDS = 5
    subject, caps = await _capped(tenant_factory, "8")
    leases = Leases()
    draw = await leases.draw(subject=subject, caps=caps, amount=Decimal("0.1"), hop=hop)
    [lease] = draw.leases
    await hop(lease_book, reservation_id=lease.reservation_id, period_id=lease.period_id, actual=Decimal("0.02"))
    leases.settled(draw, actual=Decimal("0.02"), hop=hop)
    tries = []

    async def restarting(fn, /, **kwargs):
        tries.append(fn.__name__)
        if len(tries) <= 2:
            raise OperationalError("the database system is starting up")
        return await hop(fn, **kwargs)

    leases.close_tenant(subject.tenant_id, restarting)
    await asyncio.gather(*leases.background)
    assert tries == ["lease_release"] * 3
    assert (await adb(Reservation.objects.get)(pk=lease.reservation_id)).status == "settled"
    assert (await _period()).reserved_usd == 0
