"""billing/metering.py is the one path for money: nothing outside billing/ holds, settles, books
a lease or writes a UsageRecord (read from the source), and a provider's refusal costs $0 on
every surface — socket turn, REST turn, /v1 streamed and not, summary, moderation — with the
hold released."""

from __future__ import annotations

import ast
import json
from decimal import Decimal
from pathlib import Path

import httpx2
import pytest

from billing.caps import Subject
from billing.metering import CallFacts, call_book, call_hold
from billing.models import CapPeriod, ModelPrice, Reservation, SpendingCap, UsageRecord
from billing.services import Price, price_for
from conversations import summaries
from llm.gateway import UpstreamError, Usage
from llm.moderation import MODERATION_MODEL
from tests.conftest import adb
from tests.v1direct import closing_hop, v1_handle

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
APPS = ("compat", "config", "conversations", "llm", "moderation", "routing", "tenants", "tools", "simulator")
REFUSE = "[[sim:status=400]]"  # the simulator answers 400 before anything streams
MODEL = "gpt-4o-mini"

# --- the rule, read from the source ---------------------------------------------------------

# Functions that hold, settle or book money, by name: only billing/ calls them.
MONEY_CALLS = frozenset({
    "cap_reserve", "cap_hold", "cap_settle", "lease_take", "lease_book", "lease_release", "usage_record",
    "reservations_expire", "release_idle", "close_tenant", "release_all",
})
# Writes through a model's manager that only billing/ makes.
LEDGER_WRITES = frozenset({"create", "bulk_create", "get_or_create", "update_or_create", "update", "delete"})


def _violations(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("billing"):
            found += [f"{where} imports {alias.name}" for alias in node.names if alias.name in MONEY_CALLS]
        elif isinstance(node, ast.Name) and node.id in MONEY_CALLS:
            found.append(f"{where} uses {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in MONEY_CALLS:
            found.append(f"{where} uses .{node.attr}")
        elif isinstance(node, ast.Attribute) and node.attr == "objects" and isinstance(node.value, ast.Name):
            if node.value.id == "Reservation":
                found.append(f"{where} touches Reservation.objects")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LEDGER_WRITES:
            chain = ast.unparse(node.func.value)
            if chain.startswith("UsageRecord.objects"):
                found.append(f"{where} writes {chain}.{node.func.attr}")
    return found


def test_nothing_outside_billing_holds_settles_books_a_lease_or_writes_a_usage_record():
    sources = [path for app in APPS for path in (ROOT / app).rglob("*.py") if "migrations" not in path.parts]
    assert len(sources) > 50  # the scan reads the apps, not an empty tree
    assert [v for path in sources for v in _violations(path)] == []


def test_the_scan_catches_each_way_of_booking_money(tmp_path):
    """The rule's own check: each forbidden form is found (a scan that finds nothing proves nothing)."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from billing.caps import cap_settle\n"
        "from billing.leases import leases\n"
        "leases().release_idle(caps, hop)\n"
        "cap_settle(reservation=r, actual=0)\n"
        "leases.lease_book(reservation_id=1, period_id=1, actual=0)\n"
        "Reservation.objects.filter(status='held')\n"
        "UsageRecord.objects.create(call_id='x')\n"
        "UsageRecord.objects.filter(call_id='x').first()\n"
    )
    found = sorted(line.split(" ", 1)[1] for line in _violations(sample))
    assert found == [
        "imports cap_settle", "touches Reservation.objects", "uses .lease_book", "uses .release_idle", "uses cap_settle",
        "writes UsageRecord.objects.create",
    ]


# --- the primitive --------------------------------------------------------------------------


def _capped(tenant_factory, limit: str = "5"):
    setup = tenant_factory()
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal(limit))
    return setup, Subject(setup.tenant.pk, setup.end_user().pk)


def test_booking_twice_writes_one_record_and_settles_once(tenant_factory):
    setup, subject = _capped(tenant_factory)
    hold = call_hold(subject=subject, price=price_for(MODEL), prompt_tokens=100, max_tokens=50, call_id="c-1")
    usage = Usage(prompt_tokens=90, completion_tokens=40, cached_tokens=60)
    first = call_book(hold=hold, usage=usage, facts=CallFacts())
    again = call_book(hold=hold, usage=usage, facts=CallFacts())

    assert first.pk == again.pk and UsageRecord.objects.count() == 1
    # Cached input at its own price.
    price = price_for(MODEL)
    assert first.cost_usd == price.cost(prompt_tokens=90, completion_tokens=40, cached_tokens=60)
    period = CapPeriod.objects.get()
    assert (period.spent_usd, period.reserved_usd) == (first.cost_usd, 0)


def test_without_usage_the_prompt_and_what_streamed_are_counted(tenant_factory):
    from llm.tokens import count_text

    setup, subject = _capped(tenant_factory)
    hold = call_hold(subject=subject, price=price_for(MODEL), prompt_tokens=100, max_tokens=50, call_id="c-2")
    record = call_book(hold=hold, usage=None, error=UpstreamError("cut", code="upstream_error"), streamed=True,
                       content="what streamed before the cut", facts=CallFacts(outcome="error"))
    assert (record.prompt_tokens, record.estimated) == (100, True)
    assert record.completion_tokens == count_text("what streamed before the cut", MODEL) > 0


def test_a_free_call_is_admitted_past_a_spent_cap_without_a_hold(tenant_factory):
    setup, subject = _capped(tenant_factory, "1")
    paid = call_hold(subject=subject, price=price_for(MODEL), prompt_tokens=10, max_tokens=10, call_id="c-0")
    call_book(hold=paid, usage=Usage(prompt_tokens=10, completion_tokens=10, cached_tokens=0), facts=CallFacts())
    CapPeriod.objects.update(spent_usd=Decimal("1.5"))  # spent past the limit (a provider overran a hold)
    free = Price(model="free-model", input=Decimal(0), cached_input=Decimal(0), output=Decimal(0), context_window=1000)
    hold = call_hold(subject=subject, price=free, prompt_tokens=10, max_tokens=10, call_id="c-3")
    assert hold.reservation is None and hold.amount == 0
    with pytest.raises(Exception) as refused:
        call_hold(subject=subject, price=price_for(MODEL), prompt_tokens=10, max_tokens=10, call_id="c-4")
    assert type(refused.value).__name__ == "CapExceeded"


# --- refused ⇒ $0, one test per surface -------------------------------------------------------


def _refused_for_nothing(tenant, kind: str) -> UsageRecord:
    """The refused call's one record costs $0 and nothing stays held or spent."""
    record = UsageRecord.objects.get(tenant=tenant, kind=kind)
    assert (record.outcome, record.cost_usd, record.prompt_tokens, record.completion_tokens) == ("error", 0, 0, 0)
    assert not Reservation.objects.filter(tenant=tenant, status="held").exists()
    assert all((p.spent_usd, p.reserved_usd) == (0, 0) for p in CapPeriod.objects.filter(tenant=tenant))
    return record


async def test_a_refused_socket_turn_costs_nothing_and_releases_its_hold(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)(monthly_cap_usd=Decimal("5"))
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn(f"hello {REFUSE}")
    assert events[-1]["type"] == "error" and sim.stats.requests == 1
    await adb(_refused_for_nothing)(setup.tenant, "chat")


def test_a_refused_rest_turn_costs_nothing_and_releases_its_hold(parley, tenant_factory, sim):
    setup = tenant_factory(monthly_cap_usd=Decimal("5"))
    with httpx2.Client(base_url=parley.url, headers={"Authorization": f"Bearer {setup.api_key}"}, timeout=15) as http:
        conversation_id = http.post("/api/v1/conversations/", json={}).json()["id"]
        reply = http.post(f"/api/v1/conversations/{conversation_id}/messages/",
                          json={"content": f"hello {REFUSE}", "stream": False})
    assert reply.status_code >= 400 or reply.json()["status"] == "incomplete", reply.text
    _refused_for_nothing(setup.tenant, "chat")


@pytest.fixture
def v1_in_process(monkeypatch):
    from compat import calls, openai_api

    monkeypatch.setattr(openai_api, "db", closing_hop)
    monkeypatch.setattr(calls, "db_after", closing_hop)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_refused_v1_call_costs_nothing_and_releases_its_hold(tenant_factory, sim, v1_in_process, settings, stream):
    settings.CAP_LEASE_SECONDS = 0  # an exact hold: released, it is visible in the database
    setup = await adb(tenant_factory)(monthly_cap_usd=Decimal("5"))
    body = {"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": f"hi {REFUSE}"}]}
    sent = await v1_handle(setup.api_key, json.dumps(body).encode())

    assert sent[0]["status"] == 400 and sim.stats.requests == 1
    await adb(_refused_for_nothing)(setup.tenant, "completion")
    assert await Reservation.objects.filter(tenant=setup.tenant).aexists()  # it was held, then released


def test_a_refused_summary_costs_nothing_and_releases_its_hold(tenant_factory, sim):
    from tests.test_history import _long

    setup = tenant_factory(monthly_cap_usd=Decimal("5"))
    conversation = _long(setup)
    sim.inject(status=400)
    with pytest.raises(UpstreamError):
        summaries.conversation_summarize(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)
    _refused_for_nothing(setup.tenant, "summary")
    assert Reservation.objects.filter(tenant=setup.tenant, call_id__startswith="sum-").exists()


async def test_a_refused_moderation_call_costs_nothing_and_releases_its_hold(tenant_factory, sim):
    from tests.test_moderation import world

    w = await world(tenant_factory, use_provider=True, monthly_cap_usd=Decimal("5"))
    # Priced, so the call holds something and a refusal billed at our count would cost money.
    await ModelPrice.objects.filter(model=MODERATION_MODEL).aupdate(input_per_million=Decimal("10"))
    sim.inject_moderation(status=400)

    verdict = await w.check("a question about gardening")

    assert verdict.provider_error == "upstream_error" and sim.stats.moderations == 1
    await adb(_refused_for_nothing)(w.setup.tenant, "moderation")
    assert await Reservation.objects.filter(tenant=w.setup.tenant, call_id__startswith="mod-").aexists()
