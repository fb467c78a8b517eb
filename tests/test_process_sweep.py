"""The /v1 side of a dead web process (billing/processes.py): its liveness record, the sweep
that books its calls' last checkpoints and releases its holds, and the claim that makes the
sweep happen once — never a second booking, whether the process was dead or only slow."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone

from billing.caps import Subject, cap_hold, caps_for
from billing.leases import Draw, Lease, lease_take
from billing.metering import Hold
from billing.models import CapPeriod, Reservation, SpendingCap, UsageRecord, WebProcess
from billing.processes import process_alive, process_beat, process_recover, process_register, processes_recover
from billing.services import price_for
from compat.calls import CompletionCall
from compat.completions import CompletionPlan, completion_settle
from llm.gateway import Usage
from llm.relay import StreamRelay
from llm.tokens import count_text

MODEL = "gpt-4o"
STREAMED = "Once upon a time there was a process that streamed these words and then died."


def _setup(tenant_factory):
    setup = tenant_factory()
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=5)
    end_user = setup.end_user()
    api_key_id = setup.tenant.api_keys.get().pk
    return setup, Subject(setup.tenant.pk, end_user.pk, api_key_id)


def _plan(subject: Subject, process_id: uuid.UUID, *, reservation=None, draw=None, call_id=None) -> CompletionPlan:
    hold = Hold(
        call_id=call_id or f"cmpl-{uuid.uuid4()}", subject=subject, model=MODEL, price=price_for(MODEL),
        prompt_tokens=12, amount=Decimal("0.5"), reservation=reservation, draw=draw, process_id=process_id,
    )
    return CompletionPlan(hold=hold, target=None, upstream_body=b"{}", stream=True, forward_usage=False)


def _streaming(plan: CompletionPlan) -> CompletionCall:
    """A call in flight that has relayed STREAMED (the provider's usage not arrived yet)."""
    call = CompletionCall(plan, time.monotonic())
    call.stream = StreamRelay(response=None, forward_usage=False)
    for word in STREAMED.split(" "):
        call.stream.events.append(b'data: {"choices":[{"index":0,"delta":{"content":"%s "}}]}' % word.encode())
    return call


def _leased(subject: Subject, process_id: uuid.UUID) -> tuple[Draw, Reservation]:
    [(cap, key)] = caps_for(subject)
    grant = lease_take(subject=subject, cap=cap, key=key, at_least=Decimal("0.1"), most=Decimal(1), share=1,
                       process_id=process_id)
    lease = Lease(ident=(cap.pk, key, timezone.now()), tenant_id=subject.tenant_id, reservation_id=grant.reservation_id,
                  period_id=grant.period_id, available=grant.amount - Decimal("0.1"), closes_at=time.monotonic() + 60,
                  outstanding=1)
    return Draw(leases=(lease,), amount=Decimal("0.1")), Reservation.objects.get(pk=grant.reservation_id)


def _stop_beating(process_id: uuid.UUID) -> None:
    WebProcess.objects.filter(pk=process_id).update(beat_at=timezone.now() - timedelta(hours=1))


def _period() -> CapPeriod:
    return CapPeriod.objects.get()


def _ledger_agrees() -> None:
    assert not Reservation.objects.filter(status="held").exists()
    assert _period().reserved_usd == 0
    assert _period().spent_usd == sum(r.cost_usd for r in UsageRecord.objects.all())
    call_command("reconcile_caps")  # SystemExit(1) on drift


@pytest.mark.django_db
def test_a_dead_process_is_swept_once_from_its_last_checkpoint(tenant_factory):
    setup, subject = _setup(tenant_factory)
    process_id = process_register()
    reservation = cap_hold(subject=subject, caps=caps_for(subject), amount=Decimal("0.5"), call_id="cmpl-x",
                           process_id=process_id)
    plan = _plan(subject, process_id, reservation=reservation, call_id="cmpl-x")
    assert process_beat(process_id=process_id, calls=[_streaming(plan).checkpoint()])
    # Admitted after the last beat: no checkpoint, its hold goes back at zero.
    late = cap_hold(subject=subject, caps=caps_for(subject), amount=Decimal("0.5"), call_id="cmpl-late",
                    process_id=process_id)

    assert processes_recover() == 0  # still beating
    _stop_beating(process_id)
    assert processes_recover() == 1
    assert processes_recover() == 0 and not process_recover(process_id=process_id)  # claimed once

    [record] = UsageRecord.objects.all()
    assert (record.call_id, record.outcome, record.estimated) == ("cmpl-x", "interrupted", True)
    assert record.completion_tokens == count_text(STREAMED + " ", MODEL) and record.prompt_tokens == 12
    assert record.cost_usd > 0
    reservation.refresh_from_db()
    assert (reservation.status, reservation.actual_usd) == ("settled", record.cost_usd)
    assert Reservation.objects.get(pk=late.pk).actual_usd == 0
    assert not WebProcess.objects.exists()
    _ledger_agrees()


@pytest.mark.django_db
def test_calls_the_sweep_did_not_see_are_settled_consistently_by_a_process_that_lived(tenant_factory):
    """A stalled process, swept: a call admitted after its last beat had its hold settled at
    zero, so it books nothing now; one admitted after the sweep (under the old id, before the
    process noticed) was never seen by the sweep and books as usual."""
    setup, subject = _setup(tenant_factory)
    process_id = process_register()
    unseen = cap_hold(subject=subject, caps=caps_for(subject), amount=Decimal("0.5"), call_id="cmpl-unseen",
                      process_id=process_id)
    _stop_beating(process_id)
    assert process_recover(process_id=process_id)
    after = cap_hold(subject=subject, caps=caps_for(subject), amount=Decimal("0.5"), call_id="cmpl-after",
                     process_id=process_id)
    usage = Usage(prompt_tokens=12, completion_tokens=300, cached_tokens=0)

    for reservation in (unseen, after):
        plan = _plan(subject, process_id, reservation=reservation, call_id=reservation.call_id)
        completion_settle(plan=plan, usage=usage, content="", outcome="ok", latency_ms=1, ttft_ms=1)

    assert list(UsageRecord.objects.values_list("call_id", flat=True)) == ["cmpl-after"]
    assert Reservation.objects.get(pk=after.pk).actual_usd == UsageRecord.objects.get().cost_usd > 0
    _ledger_agrees()


@pytest.mark.django_db
def test_a_process_swept_while_alive_books_nothing_again(tenant_factory):
    """Slow, not dead: the sweep billed its checkpoint and returned its lease; the call's own
    settlement afterwards (with the provider's full usage) books nothing a second time."""
    setup, subject = _setup(tenant_factory)
    process_id = process_register()
    draw, lease = _leased(subject, process_id)
    plan = _plan(subject, process_id, draw=draw)
    assert process_beat(process_id=process_id, calls=[_streaming(plan).checkpoint()])
    _stop_beating(process_id)
    assert process_recover(process_id=process_id)
    swept = UsageRecord.objects.get(call_id=plan.call_id)
    spent = _period().spent_usd
    assert spent == swept.cost_usd > 0
    lease.refresh_from_db()
    assert lease.status == "settled"

    assert not process_beat(process_id=process_id, calls=[])  # how the process learns it
    returned = completion_settle(plan=plan, usage=Usage(prompt_tokens=12, completion_tokens=900, cached_tokens=0),
                                 content="", outcome="ok", latency_ms=1, ttft_ms=1)
    assert returned.pk == swept.pk
    assert UsageRecord.objects.count() == 1 and _period().spent_usd == spent
    _ledger_agrees()


@pytest.mark.django_db
def test_a_call_the_process_settled_before_it_died_is_not_booked_twice(tenant_factory):
    setup, subject = _setup(tenant_factory)
    process_id = process_register()
    draw, lease = _leased(subject, process_id)
    reserved = cap_hold(subject=subject, caps=caps_for(subject), amount=Decimal("0.5"), call_id="cmpl-exact",
                        process_id=process_id)
    leased_plan = _plan(subject, process_id, draw=draw)
    exact_plan = _plan(subject, process_id, reservation=reserved, call_id="cmpl-exact")
    # The last beat saw both in flight; then both finished and were booked; then it died.
    assert process_beat(process_id=process_id, calls=[_streaming(leased_plan).checkpoint(),
                                                      _streaming(exact_plan).checkpoint()])
    usage = Usage(prompt_tokens=12, completion_tokens=300, cached_tokens=0)
    for plan in (leased_plan, exact_plan):
        completion_settle(plan=plan, usage=usage, content="", outcome="ok", latency_ms=1, ttft_ms=1)
    spent = _period().spent_usd
    _stop_beating(process_id)

    assert process_recover(process_id=process_id)

    assert UsageRecord.objects.count() == 2 and not UsageRecord.objects.filter(outcome="interrupted").exists()
    assert _period().spent_usd == spent  # the lease gave back its rest, booking nothing more
    lease.refresh_from_db()
    assert lease.status == "settled"
    _ledger_agrees()


services_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="row locks need PostgreSQL")


@services_only
@pytest.mark.django_db(transaction=True)
def test_a_settlement_in_progress_holds_off_the_sweep(tenant_factory):
    """The process's KEY SHARE lock on its row (taken by every held call's settlement) and the
    sweep's claim exclude each other: the sweep skips a process that is booking, and claims it
    once that is done."""
    process_id = process_register()
    _stop_beating(process_id)
    locked, release = threading.Event(), threading.Event()

    def settling() -> None:
        try:
            with transaction.atomic():
                assert process_alive(process_id)
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    thread = threading.Thread(target=settling)
    thread.start()
    assert locked.wait(10)
    try:
        assert not process_recover(process_id=process_id)  # skipped, not waited for
    finally:
        release.set()
        thread.join()
    assert process_recover(process_id=process_id)
    assert not process_alive(process_id)


@services_only
@pytest.mark.django_db(transaction=True)
def test_concurrent_sweepers_claim_a_dead_process_once(tenant_factory):
    setup, subject = _setup(tenant_factory)
    process_id = process_register()
    draw, _ = _leased(subject, process_id)
    plan = _plan(subject, process_id, draw=draw)
    process_beat(process_id=process_id, calls=[_streaming(plan).checkpoint()])
    _stop_beating(process_id)
    start = threading.Barrier(4)
    results: list[bool] = []

    def sweep() -> None:
        try:
            start.wait(10)
            results.append(process_recover(process_id=process_id))
        finally:
            connection.close()

    threads = [threading.Thread(target=sweep) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, False, False, True]
    assert UsageRecord.objects.count() == 1
    _ledger_agrees()


@pytest.mark.django_db(transaction=True)
async def test_a_beat_that_finds_its_process_swept_cuts_its_calls_and_registers_again(
    tenant_factory, settings, monkeypatch
):
    """The process's side of a sweep it survived: its calls end at their next chunk (their
    checkpoints were billed), its leases are forgotten, and its next hold is under a new id."""
    from compat import calls, v1_liveness
    from tests.conftest import adb, wait_for
    from tests.v1direct import closing_hop

    monkeypatch.setattr(calls, "db_after", closing_hop)
    settings.GENERATION_HEARTBEAT_SECONDS = 0.05
    setup, subject = await adb(_setup)(tenant_factory)
    process_id = await v1_liveness.process_id(closing_hop)
    call = _streaming(await adb(_plan)(subject, process_id))
    monkeypatch.setitem(calls._calls, asyncio.current_task(), call)
    # Beats write its checkpoint…
    checkpointed = WebProcess.objects.filter(pk=process_id, calls__0__call_id=call.plan.call_id)
    await wait_for(checkpointed.aexists, timeout=5)
    # …until the sweep takes the process (here: only the claim, its row deleted).
    await WebProcess.objects.filter(pk=process_id).adelete()
    async def cut() -> bool:
        return call.interrupted is not None

    await wait_for(cut, timeout=5)
    assert await v1_liveness.process_id(closing_hop) != process_id
