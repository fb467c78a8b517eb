"""Spending caps: reservations under real concurrency, settlement, rollover, alerts, expiry."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import F, Sum

from billing import caps
from billing.caps import CapExceeded, Subject, cap_reserve, cap_settle, period_bounds
from billing.models import CapPeriod, Reservation, SpendingCap, UsageRecord
from conversations import answers, turns
from conversations.gatekeepers import Caller
from tests.conftest import adb
from tests.turns import turn_upstream

pytestmark = pytest.mark.django_db(transaction=True)


def _concurrent_turns(caller: Caller, count: int, content: str = "hello [[sim:words=20]]") -> dict[str, int]:
    """`count` chat turns at once, each in its own thread with its own DB connection."""
    barrier = threading.Barrier(count)
    outcomes: list[str] = []
    lock = threading.Lock()

    def turn() -> None:
        try:
            barrier.wait()
            try:
                plan = turns.turn_prepare(
                    caller=caller, content=content, conversation_id=None,
                    assistant_slug=None, client_msg_id=None, control_channel="test",
                )
            except CapExceeded:
                result = "refused"
            else:
                answers.turn_finish(plan=plan, outcome=turn_upstream(plan))
                result = "served"
        except Exception as error:  # surfaced through the assertion below
            result = f"crashed: {error!r}"
        finally:
            connection.close()
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=turn) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    summary: dict[str, int] = {}
    for outcome in outcomes:
        summary[outcome] = summary.get(outcome, 0) + 1
    return summary


def _setup(tenant_factory, *, max_tokens: int = 40):
    setup = tenant_factory(user_rpm=10_000)
    setup.tenant.tenant_rpm = 10_000
    setup.tenant.save()
    setup.assistant.max_tokens = max_tokens
    setup.assistant.save()
    end_user = setup.end_user()
    return setup, Caller(tenant_id=setup.tenant.pk, end_user_id=end_user.pk)


def _one_turn_cost(caller: Caller) -> Decimal:
    plan = turns.turn_prepare(
        caller=caller, content="hello [[sim:words=20]]", conversation_id=None,
        assistant_slug=None, client_msg_id=None, control_channel="test",
    )
    return answers.turn_finish(plan=plan, outcome=turn_upstream(plan)).cost_usd


def test_fifty_concurrent_turns_never_exceed_the_tenant_cap(tenant_factory, sim):
    setup, caller = _setup(tenant_factory)
    cost = _one_turn_cost(caller)
    UsageRecord.objects.all().delete()  # the probe turn was not under the cap
    sim.reset()
    cap = SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=cost * 10)

    summary = _concurrent_turns(caller, 50)

    assert set(summary) <= {"served", "refused"}, summary
    assert summary.get("refused", 0) >= 35 and summary.get("served", 0) >= 5
    spent = UsageRecord.objects.filter(tenant=setup.tenant).aggregate(total=Sum("cost_usd"))["total"]
    assert spent <= cap.limit_usd
    assert UsageRecord.objects.filter(tenant=setup.tenant).count() == summary["served"]
    assert sim.stats.requests == summary["served"]  # refused turns never reached the model
    period = CapPeriod.objects.get(cap=cap)
    assert period.spent_usd == spent and period.reserved_usd == 0
    assert not Reservation.objects.filter(status="held").exists()


def test_end_user_and_tenant_caps_hold_together(tenant_factory, sim):
    setup, caller = _setup(tenant_factory)
    other = Caller(tenant_id=setup.tenant.pk, end_user_id=setup.end_user("other").pk)
    cost = _one_turn_cost(caller)
    UsageRecord.objects.all().delete()
    sim.reset()
    per_user = SpendingCap.objects.create(tenant=setup.tenant, scope="end_user", period="day", limit_usd=cost * 4)
    tenant_cap = SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=cost * 7)

    first = _concurrent_turns(caller, 25)
    second = _concurrent_turns(other, 25)

    by_user = dict(
        UsageRecord.objects.filter(tenant=setup.tenant).values_list("end_user_id").annotate(total=Sum("cost_usd"))
    )
    assert all(total <= per_user.limit_usd for total in by_user.values())
    assert sum(by_user.values()) <= tenant_cap.limit_usd
    assert first.get("served", 0) <= 4 and first.get("served", 0) + second.get("served", 0) <= 7
    assert sim.stats.requests == first.get("served", 0) + second.get("served", 0)


def test_refusal_says_which_cap_what_remains_and_when_it_resets(tenant_factory):
    setup, caller = _setup(tenant_factory, max_tokens=1000)
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="day", limit_usd=Decimal("0.0001"))
    with pytest.raises(CapExceeded) as refused:
        turns.turn_prepare(
            caller=caller, content="hi", conversation_id=None,
            assistant_slug=None, client_msg_id=None, control_channel="test",
        )
    error = refused.value
    assert error.scope == "tenant" and error.period == "day"
    assert error.remaining == Decimal("0.0001")
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    assert error.resets_at == tomorrow
    assert 0 < error.retry_after <= 86400
    # A refused turn leaves nothing behind: no message, no reservation, no usage.
    from conversations.models import Message

    assert not Message.objects.exists() and not Reservation.objects.exists()


async def test_cap_refusal_on_the_socket(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    await adb(SpendingCap.objects.create)(
        tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("0.0001")
    )
    async with chat(await adb(setup.token)()) as socket:
        await socket.send({"type": "message.create", "content": "hi", "client_msg_id": "m1"})
        error = await socket.receive()
    assert error["type"] == "error" and error["code"] == "spending_cap_exceeded"
    assert error["cap"]["scope"] == "tenant" and error["cap"]["remaining_usd"] == "0.0001"
    assert error["client_msg_id"] == "m1" and error["retry_after"] > 0
    assert sim.stats.requests == 0


def test_a_model_without_a_price_is_refused_not_free(tenant_factory, sim):
    from billing.services import PriceMissing

    setup, caller = _setup(tenant_factory)
    setup.assistant.model = "gpt-unpriced"
    setup.assistant.save()
    with pytest.raises(PriceMissing):
        turns.turn_prepare(
            caller=caller, content="hi", conversation_id=None,
            assistant_slug=None, client_msg_id=None, control_channel="test",
        )
    assert sim.stats.requests == 0


@pytest.mark.parametrize(
    ("content", "outcome"),
    [
        ("fine [[sim:words=12]]", "ok"),
        ("cut [[sim:cut=4]]", "error"),
        ("retried [[sim:status=500 fail_times=1 words=9]]", "ok"),
        ("malformed [[sim:malformed=3]]", "error"),
    ],
)
def test_every_turn_is_billed_and_the_ledger_matches_what_was_served(tenant_factory, sim, content, outcome):
    setup, caller = _setup(tenant_factory)
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("10"))
    plan = turns.turn_prepare(
        caller=caller, content=content, conversation_id=None,
        assistant_slug=None, client_msg_id=None, control_channel="test",
    )
    answers.turn_finish(plan=plan, outcome=turn_upstream(plan))

    record = UsageRecord.objects.get(tenant=setup.tenant)
    assert record.outcome == outcome
    assert record.prompt_tokens == sim.stats.prompt_tokens
    assert record.completion_tokens == sim.stats.completion_tokens
    assert CapPeriod.objects.get().spent_usd == record.cost_usd > 0


def test_settling_twice_books_once(tenant_factory):
    setup, caller = _setup(tenant_factory)
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("1"))
    reservation = cap_reserve(subject=Subject(setup.tenant.pk), amount=Decimal("0.5"), call_id="c1")
    assert cap_settle(reservation=reservation, actual=Decimal("0.2"))
    assert not cap_settle(reservation=reservation, actual=Decimal("0.2"))
    period = CapPeriod.objects.get()
    assert (period.spent_usd, period.reserved_usd) == (Decimal("0.2"), Decimal("0"))


def test_period_rollover_starts_a_new_period_at_zero(tenant_factory, monkeypatch):
    setup, _ = _setup(tenant_factory)
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("1"))
    subject = Subject(setup.tenant.pk)

    def frozen(at: datetime) -> None:
        monkeypatch.setattr(caps.dj_timezone, "now", lambda: at)

    frozen(datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC))
    january = cap_reserve(subject=subject, amount=Decimal("0.9"), call_id="jan")
    cap_settle(reservation=january, actual=Decimal("0.9"))
    with pytest.raises(CapExceeded) as refused:
        cap_reserve(subject=subject, amount=Decimal("0.2"), call_id="jan-2")
    assert refused.value.resets_at == datetime(2026, 2, 1, tzinfo=UTC)

    frozen(datetime(2026, 2, 1, 0, 0, 0, tzinfo=UTC))
    february = cap_reserve(subject=subject, amount=Decimal("0.2"), call_id="feb")
    cap_settle(reservation=february, actual=Decimal("0.2"))
    periods = dict(CapPeriod.objects.values_list("period_start", "spent_usd"))
    assert periods == {
        datetime(2026, 1, 1, tzinfo=UTC): Decimal("0.9"),
        datetime(2026, 2, 1, tzinfo=UTC): Decimal("0.2"),
    }


def test_period_bounds_are_utc_calendar_periods():
    now = datetime(2026, 3, 11, 15, 30, tzinfo=UTC)  # a Wednesday
    assert period_bounds("day", now) == (datetime(2026, 3, 11, tzinfo=UTC), datetime(2026, 3, 12, tzinfo=UTC))
    assert period_bounds("week", now) == (datetime(2026, 3, 9, tzinfo=UTC), datetime(2026, 3, 16, tzinfo=UTC))
    assert period_bounds("month", datetime(2026, 12, 31, 23, tzinfo=UTC)) == (
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    )
    assert period_bounds("lifetime", now)[1] is None


def test_stale_reservations_are_settled_from_their_usage_record(tenant_factory):
    from billing.caps import reservations_expire

    setup, caller = _setup(tenant_factory)
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("1"))
    subject = Subject(setup.tenant.pk)
    billed = cap_reserve(subject=subject, amount=Decimal("0.3"), call_id="crashed-after-usage")
    lost = cap_reserve(subject=subject, amount=Decimal("0.3"), call_id="crashed-before-usage")
    UsageRecord.objects.create(
        call_id="crashed-after-usage", tenant=setup.tenant, model="gpt-4o-mini", cost_usd=Decimal("0.1")
    )
    Reservation.objects.update(created_at=datetime.now(UTC) - timedelta(hours=2))

    assert reservations_expire(older_than=timedelta(hours=1)) == 2
    period = CapPeriod.objects.get()
    assert (period.spent_usd, period.reserved_usd) == (Decimal("0.1"), Decimal("0"))
    assert set(Reservation.objects.values_list("status", flat=True)) == {"expired"}
    assert Reservation.objects.get(pk=billed.pk).actual_usd == Decimal("0.1")
    assert Reservation.objects.get(pk=lost.pk).actual_usd == Decimal("0")


def test_per_end_user_cap_without_an_end_user_applies_to_each_separately(tenant_factory):
    setup, _ = _setup(tenant_factory)
    SpendingCap.objects.create(tenant=setup.tenant, scope="end_user", period="day", limit_usd=Decimal("0.5"))
    alice, bob = setup.end_user("alice"), setup.end_user("bob")
    cap_reserve(subject=Subject(setup.tenant.pk, alice.pk), amount=Decimal("0.4"), call_id="a1")
    cap_reserve(subject=Subject(setup.tenant.pk, bob.pk), amount=Decimal("0.4"), call_id="b1")
    with pytest.raises(CapExceeded):
        cap_reserve(subject=Subject(setup.tenant.pk, alice.pk), amount=Decimal("0.2"), call_id="a2")
    assert CapPeriod.objects.count() == 2


def test_caps_of_another_tenant_do_not_apply(tenant_factory):
    ours, _ = _setup(tenant_factory)
    theirs, _ = _setup(tenant_factory)
    SpendingCap.objects.create(tenant=theirs.tenant, scope="tenant", period="month", limit_usd=Decimal("0"))
    reservation = cap_reserve(subject=Subject(ours.tenant.pk), amount=Decimal("5"), call_id=str(uuid.uuid4()))
    assert reservation.period_ids == []


def test_reconciliation_finds_no_drift_after_real_turns_and_reports_tampering(tenant_factory, sim):
    import json as json_module
    from io import StringIO

    from django.core.management import call_command

    setup, caller = _setup(tenant_factory)
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("10"))
    SpendingCap.objects.create(tenant=setup.tenant, scope="end_user", period="day", limit_usd=Decimal("5"))
    _concurrent_turns(caller, 8)
    held = cap_reserve(subject=Subject(setup.tenant.pk, caller.end_user_id), amount=Decimal("0.01"), call_id="open")

    out = StringIO()
    call_command("reconcile_caps", "--tenant", setup.tenant.slug, stdout=out)
    report = json_module.loads(out.getvalue())
    assert report == {"periods_checked": 2, "drift": []}

    CapPeriod.objects.filter(cap__scope="tenant").update(spent_usd=F("spent_usd") + Decimal("0.5"))
    out = StringIO()
    with pytest.raises(SystemExit):
        call_command("reconcile_caps", stdout=out)
    drift = json_module.loads(out.getvalue())["drift"]
    assert len(drift) == 1 and drift[0]["counted_reserved_usd"] == "0.01"
    assert held.status == "held"


def test_a_moderation_model_is_not_a_chat_model(tenant_factory, sim):
    from billing.services import PriceMissing

    setup, caller = _setup(tenant_factory)
    setup.assistant.model = "omni-moderation-latest"  # priced ($0), but for moderation calls
    setup.assistant.save()
    with pytest.raises(PriceMissing):
        turns.turn_prepare(
            caller=caller, content="hi", conversation_id=None,
            assistant_slug=None, client_msg_id=None, control_channel="test",
        )
    assert sim.stats.requests == 0
