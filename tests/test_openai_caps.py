"""Money on the OpenAI-compatible endpoint: what a call is counted and held at before it goes
upstream, what it is billed after, and that every way a request ends gives its hold back."""

from __future__ import annotations

import json
from decimal import Decimal
from io import StringIO

import httpx2
import openai
import pytest
from django.core.management import call_command
from django.db.models import F

from billing.leases import leases, leases_forget
from billing.metering import worst_case_cost
from billing.models import CapPeriod, Reservation, SpendingCap, UsageRecord
from billing.services import price_for
from llm.tokens import count_messages
from tests.conftest import adb
from tests.v1direct import closing_hop, v1_handle

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gpt-4o"  # $3.75 / $15 per 1M tokens: a cap's four decimal places see a few thousand tokens


def _client(parley, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=parley.openai_base_url, api_key=api_key, max_retries=0)


@pytest.fixture(autouse=True)
def _leases_forgotten():
    yield
    leases_forget()  # their rows go with the database flush: nothing to give back at exit


def _cap(setup, limit: str, scope: str = "end_user") -> SpendingCap:
    """A per-end-user cap is held per call (never leased): each call's hold is its own row."""
    return SpendingCap.objects.create(tenant=setup.tenant, scope=scope, period="month", limit_usd=Decimal(limit))


def _refused(client: openai.OpenAI, **request) -> bool:
    try:
        client.chat.completions.create(**request)
    except openai.RateLimitError as error:
        assert error.code == "spending_cap_exceeded"
        return True
    return False


def _held(tenant) -> Decimal:
    return Reservation.objects.get(tenant_id=tenant.pk, call_id__startswith="cmpl-").amount_usd


def _headroom(tenant) -> Decimal:
    period = CapPeriod.objects.get(tenant=tenant)
    return period.limit_usd - period.spent_usd - period.reserved_usd


# --- what is counted ----------------------------------------------------------------------


def test_a_long_prompt_is_refused_as_a_string_and_as_text_parts_alike(parley, tenant_factory, sim):
    setup = tenant_factory(user_rpm=100)
    _cap(setup, "0.01")  # ~2,600 prompt tokens of gpt-4o
    client = _client(parley, setup.api_key)
    text = "a long prompt " * 2000

    assert _refused(client, model=MODEL, max_tokens=20, messages=[{"role": "user", "content": text}])
    parts = [{"type": "text", "text": text[:len(text) // 2]}, {"type": "text", "text": text[len(text) // 2:]}]
    assert _refused(client, model=MODEL, max_tokens=20, messages=[{"role": "user", "content": parts}])
    assert sim.stats.requests == 0 and not UsageRecord.objects.exists()
    # The same holds for tool definitions: they are prompt too.
    tools = [{"type": "function", "function": {"name": "lookup", "description": text, "parameters": {}}}]
    hi = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert _refused(client, model=MODEL, max_tokens=20, messages=hi, tools=tools)
    assert sim.stats.requests == 0
    assert not _refused(client, model=MODEL, max_tokens=20, messages=hi)  # short parts fit
    assert sim.stats.requests == 1


def test_the_tokens_per_minute_limit_counts_text_parts(parley, tenant_factory, sim):
    setup = tenant_factory(tenant_tpm=8000)
    client = _client(parley, setup.api_key)
    parts = [{"type": "text", "text": "a long prompt " * 1000}]  # ~3,000 tokens
    for _ in range(2):
        client.chat.completions.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": parts}])
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, max_tokens=20, messages=[{"role": "user", "content": parts}])
    assert refused.value.code == "rate_limited" and sim.stats.requests == 2


def test_an_image_part_is_held_at_the_most_it_can_cost(parley, tenant_factory, sim):
    setup = tenant_factory()
    _cap(setup, "5")
    client = _client(parley, setup.api_key)
    text = {"type": "text", "text": "What is in this picture?"}
    as_string = [{"role": "user", "content": text["text"]}]

    for model, detail, bound in (("gpt-4o-mini", "low", 2833), (MODEL, None, 85 + 8 * 170)):
        image = {"url": "https://example.com/cat.png", **({"detail": detail} if detail else {})}
        client.chat.completions.create(
            model=model, max_tokens=20, messages=[{"role": "user", "content": [text, {"type": "image_url", "image_url": image}]}],
        )
        expected = worst_case_cost(
            price=price_for(model), prompt_tokens=count_messages(as_string, model) + bound, max_tokens=20
        )
        assert _held(setup.tenant) == expected
        Reservation.objects.filter(tenant_id=setup.tenant.pk).delete()


def test_content_whose_cost_cannot_be_bounded_is_refused(parley, tenant_factory, sim):
    setup = tenant_factory()
    client = _client(parley, setup.api_key)
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [audio]}])
    assert caught.value.code == "invalid_request" and caught.value.body["param"] == "messages"
    assert sim.stats.requests == 0 and not UsageRecord.objects.exists()


# --- what is held -------------------------------------------------------------------------


def test_the_hold_is_the_largest_output_allowed_times_n(parley, tenant_factory, sim):
    setup = tenant_factory(user_rpm=100)
    _cap(setup, "0.01")  # 2,000 output tokens of gpt-4o cost $0.03; 300 cost $0.0045
    client = _client(parley, setup.api_key)
    hi = [{"role": "user", "content": "hi"}]

    assert _refused(client, model=MODEL, messages=hi, max_tokens=1, max_completion_tokens=2000)
    assert _refused(client, model=MODEL, messages=hi, max_completion_tokens=1, max_tokens=2000)
    assert _refused(client, model=MODEL, messages=hi, max_tokens=300, n=5)
    assert sim.stats.requests == 0
    assert not _refused(client, model=MODEL, messages=hi, max_tokens=300)
    assert _held(setup.tenant) == worst_case_cost(price=price_for(MODEL), prompt_tokens=count_messages(hi, MODEL),
                                                  max_tokens=300)


# --- what is billed -----------------------------------------------------------------------


def test_a_provider_refusal_costs_nothing_and_holds_nothing(parley, tenant_factory, sim):
    setup = tenant_factory()
    _cap(setup, "1")
    client = _client(parley, setup.api_key)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(
                model=MODEL, stream=stream, messages=[{"role": "user", "content": "no [[sim:status=400]]"}]
            )
    records = list(UsageRecord.objects.filter(tenant=setup.tenant))
    assert [(r.outcome, r.prompt_tokens, r.completion_tokens, r.cost_usd) for r in records] == [("error", 0, 0, 0)] * 2
    period = CapPeriod.objects.get(tenant=setup.tenant)
    assert (period.spent_usd, period.reserved_usd) == (0, 0)


# --- every exit gives the hold back -------------------------------------------------------


def _post(parley, api_key: str, raw: bytes) -> int:
    response = httpx2.post(
        f"{parley.openai_base_url}/chat/completions", content=raw, timeout=10,
        headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
    )
    return response.status_code


# json.loads accepts an escaped lone surrogate; it fails only where the text is encoded again.
LONE_SURROGATE = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]}).encode()


def test_a_request_that_fails_after_admission_leaves_no_hold(parley, tenant_factory, sim):
    setup = tenant_factory()
    _cap(setup, "1")
    _client(parley, setup.api_key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    before = _headroom(setup.tenant)

    assert _post(parley, setup.api_key, LONE_SURROGATE) >= 400

    assert _headroom(setup.tenant) == before
    assert not Reservation.objects.filter(tenant_id=setup.tenant.pk, status="held").exists()


@pytest.fixture
def in_process(monkeypatch):
    from compat import calls, openai_api

    # the endpoint's own threads would keep a connection open
    monkeypatch.setattr(openai_api, "db", closing_hop)
    monkeypatch.setattr(calls, "db_after", closing_hop)


async def test_a_leased_call_that_fails_after_admission_gives_its_draw_back(tenant_factory, sim, in_process):
    setup = await adb(tenant_factory)()
    await adb(_cap)(setup, "5", scope="tenant")
    hi = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert (await v1_handle(setup.api_key, hi))[0]["status"] == 200
    [lease] = leases().by_ident.values()
    available = lease.available

    assert (await v1_handle(setup.api_key, LONE_SURROGATE))[0]["status"] >= 400

    assert (lease.available, lease.outstanding) == (available, 0)


async def test_a_stream_that_fails_before_relaying_is_billed_and_released(tenant_factory, sim, in_process, monkeypatch):
    from compat import calls

    def broken_headers(self):
        raise RuntimeError("headers could not be built")

    monkeypatch.setattr(calls.CompletionCall, "headers", broken_headers)
    setup = await adb(tenant_factory)()
    await adb(_cap)(setup, "1")
    raw = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()

    assert (await v1_handle(setup.api_key, raw))[0]["status"] == 500

    [record] = await adb(list)(UsageRecord.objects.filter(tenant=setup.tenant))
    period = await adb(CapPeriod.objects.get)(tenant=setup.tenant)
    assert (period.spent_usd, period.reserved_usd) == (record.cost_usd, 0)
    assert record.outcome == "cancelled"


# --- reconciliation -----------------------------------------------------------------------


def _reconcile(tenant) -> tuple[int, dict]:
    out = StringIO()
    try:
        call_command("reconcile_caps", "--tenant", tenant.slug, stdout=out)
    except SystemExit as exit_:
        return int(exit_.code), json.loads(out.getvalue())
    return 0, json.loads(out.getvalue())


def test_reconciliation_after_leased_traffic_finds_only_real_drift(parley, tenant_factory, sim):
    setup = tenant_factory(user_rpm=100)
    _cap(setup, "5", scope="tenant")  # tenant caps are leased
    client = _client(parley, setup.api_key)
    for stream in (False, True, False, True):
        reply = client.chat.completions.create(
            model=MODEL, stream=stream, messages=[{"role": "user", "content": "hello [[sim:words=30]]"}]
        )
        if stream:
            list(reply)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "no [[sim:status=400]]"}])
    assert Reservation.objects.filter(tenant_id=setup.tenant.pk, call_id__startswith="lease-").exists()
    assert UsageRecord.objects.filter(tenant=setup.tenant, cost_usd__gt=0).count() == 4

    assert _reconcile(setup.tenant) == (0, {"periods_checked": 1, "drift": []})

    CapPeriod.objects.filter(tenant=setup.tenant).update(spent_usd=F("spent_usd") + Decimal("0.01"))
    code, report = _reconcile(setup.tenant)
    assert code == 1 and len(report["drift"]) == 1
