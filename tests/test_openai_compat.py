"""The OpenAI-compatible endpoint, driven by the official SDK against a live Parley server,
with the simulator as the tenant's provider over real HTTP."""

from __future__ import annotations

import json
import time

import httpx2
import openai
import pytest

from billing.models import UsageRecord
from tenants.models import ApiKey, EndUser
from tenants.services import api_keys_revoke
from tests.conftest import adb
from tests.v1direct import closing_hop, v1_handle

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gpt-4o-mini"


def _client(parley, api_key: str, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=parley.openai_base_url, api_key=api_key, max_retries=0, **options)


def _async_client(parley, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=parley.openai_base_url, api_key=api_key, max_retries=0)


def _records(tenant) -> list[UsageRecord]:
    return list(UsageRecord.objects.filter(tenant=tenant).order_by("created_at"))


def test_completion_is_answered_and_billed_once(parley, tenant_factory, sim):
    setup = tenant_factory()
    reply = _client(parley, setup.api_key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello from the SDK"}]
    )

    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content.startswith("You said: Hello from the SDK.")
    [record] = _records(setup.tenant)
    assert (record.kind, record.outcome, record.model) == ("completion", "ok", MODEL)
    assert (record.prompt_tokens, record.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert not record.estimated and record.cost_usd > 0
    sent = sim.requests[-1]
    # Always a max_tokens (the default assistant's), and the end user only as a hash.
    assert sent["max_tokens"] == setup.assistant.max_tokens
    assert sent["user"].startswith("pu_") and record.end_user.external_id == "api"


async def test_stream_deltas_and_usage_chunk_match_what_was_billed(parley, tenant_factory, sim):
    setup = await adb(tenant_factory)()
    client = _async_client(parley, setup.api_key)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream to me"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("You said: Stream to me.")
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    # Written before [DONE]: a client that read to the end finds the call billed.
    [record] = await adb(_records)(setup.tenant)
    assert record.prompt_tokens == usage_chunk.usage.prompt_tokens == sim.stats.prompt_tokens
    assert record.completion_tokens == usage_chunk.usage.completion_tokens == sim.stats.completion_tokens
    assert record.outcome == "ok" and record.ttft_ms is not None


def test_stream_without_include_usage_is_openai_shaped_and_still_billed(parley, tenant_factory, sim):
    setup = tenant_factory()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "raw bytes please"}], "stream": True}
    with httpx2.Client(timeout=10) as http:
        with http.stream(
            "POST", f"{parley.openai_base_url}/chat/completions", json=body,
            headers={"Authorization": f"Bearer {setup.api_key}"},
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            raw = b"".join(response.iter_bytes())

    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["object"] == "chat.completion.chunk" and p["choices"] for p in payloads)
    assert all("usage" not in p for p in payloads)
    # We asked upstream for usage anyway: it is how the call is billed.
    assert sim.requests[-1]["stream_options"] == {"include_usage": True}
    [record] = _records(setup.tenant)
    assert record.completion_tokens == sim.stats.completion_tokens and not record.estimated


def test_tools_and_parameters_reach_the_provider_and_a_tool_round_trip_works(parley, tenant_factory, sim):
    setup = tenant_factory()
    client = _client(parley, setup.api_key)
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }]
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        response_format={"type": "text"},
        temperature=0.2,
        max_tokens=50,
        user="customer-42",
    )
    sent = sim.requests[-1]
    assert sent["tools"] == tools
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["response_format"] == {"type": "text"} and sent["temperature"] == 0.2
    assert sent["max_tokens"] == 50
    end_user = EndUser.objects.get(tenant=setup.tenant, external_id="customer-42")
    assert sent["user"].startswith("pu_") and "customer-42" not in sent["user"]

    # The second leg of a tool call: the assistant's tool_calls and the tool's result go
    # upstream as sent, and the answer comes back.
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21}'},
        ],
        tools=tools,
    )
    assert reply.choices[0].message.content
    assert sim.requests[-1]["messages"][1]["tool_calls"] == [call]
    assert sim.requests[-1]["messages"][2]["tool_call_id"] == "call_1"
    assert UsageRecord.objects.filter(tenant=setup.tenant, end_user=end_user).count() == 1


def test_bad_or_revoked_key_raises_authentication_error(parley, tenant_factory, sim):
    setup = tenant_factory()
    for key in ("pk_nothere_secret", "sk-not-even-ours", ""):
        with pytest.raises(openai.AuthenticationError) as caught:
            _client(parley, key or "x").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    _client(parley, setup.api_key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    api_keys_revoke(keys=ApiKey.objects.filter(tenant=setup.tenant))
    for call in (
        lambda client: client.models.list(),
        lambda client: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}]),
    ):
        with pytest.raises(openai.AuthenticationError):
            call(_client(parley, setup.api_key))
    assert sim.stats.requests == 1  # the call made before the key was revoked


async def test_bad_key_raises_authentication_error_async(parley, tenant_factory, sim):
    with pytest.raises(openai.AuthenticationError):
        await _async_client(parley, "pk_abc_def").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )


def test_invalid_requests_raise_bad_request_and_not_found(parley, tenant_factory, sim):
    setup = tenant_factory()
    client = _client(parley, setup.api_key)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[])
    assert caught.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-unpriced", messages=[{"role": "user", "content": "x"}])
    assert caught.value.code == "model_not_found"

    # A key limited to some models may use only those (saved as the admin saves it).
    key = ApiKey.objects.get(tenant=setup.tenant)
    key.allowed_models = ["gpt-4o"]
    key.save()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert [m.id for m in client.models.list()] == ["gpt-4o"]
    assert sim.stats.requests == 0 and not _records(setup.tenant)


def test_provider_rejection_of_the_callers_request_is_a_bad_request(parley, tenant_factory, sim):
    setup = tenant_factory()
    with pytest.raises(openai.BadRequestError) as caught:
        _client(parley, setup.api_key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x [[sim:status=400]]"}]
        )
    assert caught.value.code == "invalid_request"


def test_upstream_failure_is_502_and_the_call_is_recorded_once_at_no_cost(parley, tenant_factory, sim):
    setup = tenant_factory()
    client = _client(parley, setup.api_key)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fail [[sim:status=500]]"}])
    assert caught.value.status_code == 502 and caught.value.code == "upstream_error"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "fail [[sim:status=503]]"}], stream=True
        )
    # The provider answered with an error status: it billed nothing, and neither do we.
    records = _records(setup.tenant)
    assert [(r.outcome, r.prompt_tokens, r.completion_tokens, r.cost_usd) for r in records] == [("error", 0, 0, 0)] * 2


def test_transient_upstream_failure_is_retried_before_the_first_byte(parley, tenant_factory, sim):
    setup = tenant_factory()
    reply = _client(parley, setup.api_key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "again [[sim:status=503 fail_times=2]]"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    assert sim.stats.requests == 3 and len(_records(setup.tenant)) == 1


def test_upstream_timeout_is_504(parley, tenant_factory, sim, settings):
    settings.UPSTREAM_MAX_RETRIES = 0
    settings.UPSTREAM_FIRST_TOKEN_TIMEOUT = 0.5
    setup = tenant_factory()
    with pytest.raises(openai.InternalServerError) as caught:
        _client(parley, setup.api_key, timeout=15).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "wait [[sim:hang=1]]"}], stream=True
        )
    assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"


def test_stream_cut_midway_raises_in_the_sdk_and_bills_what_streamed(parley, tenant_factory, sim):
    setup = tenant_factory()
    stream = _client(parley, setup.api_key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "cut [[sim:cut=3]]"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert len([r for r in received if r]) == 3
    [record] = _records(setup.tenant)
    assert record.outcome == "error" and record.estimated and record.completion_tokens > 0


def test_client_that_leaves_midstream_is_billed_for_what_was_generated(parley, tenant_factory, sim):
    setup = tenant_factory()
    body = {
        "model": MODEL, "stream": True,
        "messages": [{"role": "user", "content": "long [[sim:words=400 tps=100]]"}],
    }
    with httpx2.Client(timeout=10) as http:
        with http.stream(
            "POST", f"{parley.openai_base_url}/chat/completions", json=body,
            headers={"Authorization": f"Bearer {setup.api_key}"},
        ) as response:
            deltas = 0
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    deltas += 1
                if deltas == 3:
                    break  # and leave
    deadline = time.monotonic() + 10
    while not _records(setup.tenant) and time.monotonic() < deadline:
        time.sleep(0.05)
    [record] = _records(setup.tenant)
    assert record.outcome == "cancelled" and record.estimated and 3 <= record.completion_tokens < 400
    deadline = time.monotonic() + 5
    while sim.stats.incomplete == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim.stats.incomplete == 1  # the upstream stream was closed, not left running


def test_models_list_and_retrieve(parley, tenant_factory, sim):
    setup = tenant_factory()
    client = _client(parley, setup.api_key)
    ids = [model.id for model in client.models.list()]
    assert {"gpt-4o", "gpt-4o-mini", "gpt-4-turbo", "gpt-3.5-turbo"} <= set(ids)
    assert "omni-moderation-latest" not in ids  # priced, but not a chat model
    assert client.models.retrieve("gpt-4o").id == "gpt-4o"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-unpriced")


def test_unknown_v1_path_answers_openai_shaped_404(parley, tenant_factory):
    response = httpx2.get(f"{parley.openai_base_url}/embeddings-not-here")
    error = response.json()["error"]
    assert response.status_code == 404 and set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["request_id"] == response.headers["x-request-id"]


def test_a_cap_refusal_raises_rate_limit_error_with_its_code(parley, tenant_factory, sim):
    from decimal import Decimal

    from billing.models import CapPeriod, SpendingCap

    setup = tenant_factory()
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("0.0001"))
    client = _client(parley, setup.api_key)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=500)
    assert refused.value.code == "spending_cap_exceeded" and refused.value.status_code == 429
    assert sim.stats.requests == 0 and not UsageRecord.objects.filter(tenant=setup.tenant).exists()
    # A small enough call fits, is billed and settles the cap to what it cost.
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    [record] = _records(setup.tenant)
    period = CapPeriod.objects.get(cap__tenant=setup.tenant)
    assert (period.spent_usd, period.reserved_usd) == (record.cost_usd, 0)
    assert record.completion_tokens == reply.usage.completion_tokens


def test_rate_limited_calls_raise_rate_limit_error(parley, tenant_factory, sim):
    setup = tenant_factory(user_rpm=2)
    client = _client(parley, setup.api_key)
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], user="alice")
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], user="alice")
    assert refused.value.code == "rate_limited"
    assert sim.stats.requests == 2


def test_every_configuration_change_reaches_the_very_next_call(parley, tenant_factory, sim):
    """/v1 keeps each caller's configuration in the web process between calls; a change made
    anywhere (admin, services, another process) applies to the next call, not after a TTL."""
    from decimal import Decimal

    from django.contrib.auth import get_user_model
    from django.test import Client
    from django.urls import reverse

    from billing.models import ModelPrice, SpendingCap
    from billing.services import price_for

    setup = tenant_factory(owner_email="owner@fresh.test", owner_password="a-long-password-1")
    client = _client(parley, setup.api_key)

    def ask(user: str = "alice"):
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20, user=user
        )

    ask()  # warm: the key, tenant, end user and price are cached now
    cap = SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("0.000001"))
    with pytest.raises(openai.RateLimitError) as refused:
        ask()
    assert refused.value.code == "spending_cap_exceeded"
    cap.delete()
    ask()

    price = ModelPrice.objects.get(model=MODEL, kind="chat")
    price.output_per_million *= 10
    price.save()
    reply = ask()
    record = UsageRecord.objects.filter(tenant=setup.tenant).latest("created_at")
    expected = price_for(MODEL).cost(prompt_tokens=reply.usage.prompt_tokens, completion_tokens=reply.usage.completion_tokens)
    assert record.cost_usd == expected

    admin = Client()
    admin.force_login(get_user_model().objects.get(email="owner@fresh.test"))
    alice = EndUser.objects.get(tenant=setup.tenant, external_id="alice")
    admin.post(reverse("admin:tenants_enduser_changelist"), {"action": "block", "_selected_action": [alice.pk]})
    with pytest.raises(openai.PermissionDeniedError):
        ask()  # a bulk admin action, not a save(): it announces the change itself
    ask(user="bob")

    api_keys_revoke(keys=ApiKey.objects.filter(tenant=setup.tenant))
    with pytest.raises(openai.AuthenticationError):
        ask(user="bob")


def _recording_hop():
    """A hop that records the name of each database function a call ran, and its statements."""
    from channels.db import database_sync_to_async
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    hops: list[tuple[str, list[str]]] = []

    def run(fn, kwargs):
        with CaptureQueriesContext(connection) as queries:
            result = fn(**kwargs)
        statements = [q["sql"].split()[0] for q in queries.captured_queries]
        hops.append((fn.__name__, [s for s in statements if s not in ("BEGIN", "COMMIT", "SAVEPOINT", "RELEASE")]))
        return result

    async def hop(fn, **kwargs):
        return await database_sync_to_async(run)(fn, kwargs)  # closes its connection after

    return hop, hops


async def _admit_names(setup, hop, hops) -> list[str]:
    from compat.completions import completion_admit

    hops.clear()
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "user": "carol"}
    await completion_admit(authorization=f"Bearer {setup.api_key}", request=request, hop=hop)
    return [name for name, _ in hops]


async def test_a_warm_call_touches_no_database_before_the_provider(tenant_factory, sim):
    """The path to the first token: a warm call reads nothing from the database, and a cap is
    drawn on from this process's lease — taken once, by the first capped call."""
    from decimal import Decimal

    from billing.models import SpendingCap

    setup = await adb(tenant_factory)()
    hop, hops = _recording_hop()
    assert await _admit_names(setup, hop, hops) == ["access_load"]
    assert await _admit_names(setup, hop, hops) == []
    await adb(SpendingCap.objects.create)(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("5"))
    # The version changed: reloaded; the process registers its liveness once, before its first hold.
    assert await _admit_names(setup, hop, hops) == ["access_load", "process_register", "lease_take"]
    assert await _admit_names(setup, hop, hops) == []


async def test_without_a_lease_the_one_hop_is_the_reservation(tenant_factory, sim, settings):
    from decimal import Decimal

    from django.db import connection

    from billing.models import SpendingCap

    settings.CAP_LEASE_SECONDS = 0
    setup = await adb(tenant_factory)()
    await adb(SpendingCap.objects.create)(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("5"))
    hop, hops = _recording_hop()
    await _admit_names(setup, hop, hops)
    assert await _admit_names(setup, hop, hops) == ["cap_hold"]
    [(_, statements)] = hops
    # PostgreSQL: the hold and the Reservation row in one statement; elsewhere two.
    assert statements == (["WITH"] if connection.vendor == "postgresql" else ["UPDATE", "INSERT"])


async def test_a_failure_after_the_stream_started_ends_it_with_an_error_event(tenant_factory, sim, monkeypatch):
    """Once the status line is out, a 500 can no longer be sent: the stream must still end
    (OpenAI's error event), not leave the client waiting."""
    from compat import calls, openai_api

    def broken_settle(**kwargs):
        raise RuntimeError("the ledger is down")

    monkeypatch.setattr(calls, "completion_settle", broken_settle)
    # the endpoint's own threads would keep a connection open
    monkeypatch.setattr(openai_api, "db", closing_hop)
    monkeypatch.setattr(calls, "db_after", closing_hop)
    setup = await adb(tenant_factory)()
    body = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sent = await v1_handle(setup.api_key, body)

    assert [m["type"] for m in sent][:1] == ["http.response.start"] and sent[0]["status"] == 200
    assert sent[-1]["type"] == "http.response.body" and not sent[-1].get("more_body")
    # OpenAI's in-stream error event, then [DONE]: never a stream that just stops.
    error, done = sent[-1]["body"].strip().split(b"\n\n")
    assert json.loads(error.removeprefix(b"data: "))["error"]["message"] == "internal error"
    assert done == b"data: [DONE]"
    assert sum(m["type"] == "http.response.start" for m in sent) == 1


def test_concurrent_calls_through_the_server_never_pass_the_cap(parley, tenant_factory, sim):
    """Sixty concurrent SDK calls, each able to cost its whole worst case, against a cap that
    covers about forty: the server draws on leases first and reserves exactly near the cap.
    Spend never passes it, the ledger and the cap agree, and refused calls cost nothing upstream."""
    from concurrent.futures import ThreadPoolExecutor
    from decimal import Decimal

    from billing.metering import worst_case_cost
    from billing.models import CapPeriod, SpendingCap
    from billing.services import price_for
    from llm.tokens import count_messages

    setup = tenant_factory(user_rpm=1000)
    messages = [{"role": "user", "content": "Tell me a long story [[sim:words=200]]"}]
    worst = worst_case_cost(price=price_for(MODEL), prompt_tokens=count_messages(messages, MODEL), max_tokens=30)
    limit = (worst * 40).quantize(Decimal("0.0001"))
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=limit)
    client = _client(parley, setup.api_key)

    def call(n: int) -> str:
        try:
            client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30)
        except openai.RateLimitError as refused:
            assert refused.code == "spending_cap_exceeded"
            return "refused"
        return "served"

    with ThreadPoolExecutor(max_workers=12) as pool:
        outcomes = list(pool.map(call, range(60)))

    served = outcomes.count("served")
    period = CapPeriod.objects.get(cap__tenant=setup.tenant)
    records = _records(setup.tenant)
    assert 20 <= served < 60 and len(records) == served == sim.stats.requests
    assert period.spent_usd == sum(r.cost_usd for r in records) <= limit
    assert period.spent_usd + period.reserved_usd <= limit


def test_answers_carry_openais_rate_limit_headers(parley, tenant_factory, sim):
    setup = tenant_factory(user_rpm=3)
    client = _client(parley, setup.api_key)
    messages = [{"role": "user", "content": "hi"}]
    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, user="dora", max_tokens=50)
    headers = first.headers
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("3", "2")
    assert headers["x-ratelimit-limit-tokens"] == str(setup.tenant.tenant_tpm)
    counted = setup.tenant.tenant_tpm - int(headers["x-ratelimit-remaining-tokens"])
    assert 50 < counted < 100  # the prompt and max_tokens were counted against the minute
    assert float(headers["x-ratelimit-reset-requests"].removesuffix("s")) <= 60
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=messages, user="dora", stream=True
    ) as streamed:
        assert streamed.headers["x-ratelimit-remaining-requests"] == "1"
        assert [chunk for chunk in streamed.parse()]


def test_the_tenants_content_policy_applies_to_the_endpoint(parley, tenant_factory, sim):
    """Input the policy blocks never reaches the provider and costs nothing; an answer it
    blocks is billed (it was generated) but not handed over, whole or streamed. A policy
    saved after the caller's configuration was cached applies to the very next call."""
    from moderation.models import ModerationEvent
    from moderation.services import policy_save

    setup = tenant_factory()
    client = _client(parley, setup.api_key)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "contraband?"}])  # warm
    policy_save(tenant_id=setup.tenant.pk, blocked_terms=["contraband"], input_action="block",
                check_output=True, output_action="block")
    sim.reset()

    with pytest.raises(openai.BadRequestError) as blocked:
        client.chat.completions.create(model=MODEL, messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "where can I buy Contraband?"}]},
        ])
    assert blocked.value.code == "moderation_blocked"
    assert sim.stats.requests == 0 and UsageRecord.objects.filter(tenant=setup.tenant).count() == 1

    # Input no longer checked, output still: the simulator's answer echoes the term.
    policy_save(tenant_id=setup.tenant.pk, check_input=False)
    echo = [{"role": "user", "content": "contraband"}]
    with pytest.raises(openai.BadRequestError) as blocked:
        client.chat.completions.create(model=MODEL, messages=echo)
    assert blocked.value.code == "moderation_blocked" and sim.stats.requests == 1
    with pytest.raises(openai.APIError) as cut:
        list(client.chat.completions.create(model=MODEL, messages=echo, stream=True))
    assert "content policy" in str(cut.value) and sim.stats.requests == 2
    assert UsageRecord.objects.filter(tenant=setup.tenant).count() == 3  # both answers were billed
    assert set(ModerationEvent.objects.filter(tenant=setup.tenant).values_list("direction", flat=True)) == {"input", "output"}


def test_naming_endless_unknown_models_does_not_grow_the_cache_without_bound(tenant_factory):
    from conversations import admission as access

    setup = tenant_factory()
    loaded = access.access_load(prefix=setup.api_key.split("_")[1], token=setup.api_key, external_id="api", model=MODEL)
    for n in range(1_050):
        assert access.price_load(access=loaded.access, model=f"no-such-model-{n}") is None
    assert len(access._prices) <= 1_000


def test_a_stream_checked_sentence_by_sentence_never_shows_a_blocked_sentence(parley, tenant_factory, sim):
    """With `stream_check_sentences`, each sentence is held back until it passes: the client
    gets the sentences before the blocked one, then the error event, and not a byte of it."""
    from moderation.services import policy_save

    setup = tenant_factory()
    policy_save(tenant_id=setup.tenant.pk, check_input=False, check_output=True, output_action="block",
                stream_check_sentences=True, blocked_terms=["contraband"])
    client = _client(parley, setup.api_key)
    received: list[str] = []
    with pytest.raises(openai.APIError) as cut:
        for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Nice weather. Contraband goods"}], stream=True
        ):
            received += [choice.delta.content or "" for choice in chunk.choices]
    text = "".join(received)
    assert text == "You said: Nice weather." and "content policy" in str(cut.value)
    [record] = _records(setup.tenant)
    assert record.outcome == "cancelled" and record.completion_tokens > 0  # stopped, and what was made is billed

    # A clean answer passes whole, every event in order, ending as usual.
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "All good. Really"}], stream=True,
        stream_options={"include_usage": True},
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("You said: All good. Really")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == _records(setup.tenant)[-1].completion_tokens


def test_a_wrong_secret_with_a_real_prefix_creates_nothing(parley, tenant_factory, sim):
    """The prefix of a key is not a secret (the admin shows it): with a wrong secret after it,
    cold or warm cache, the call is a 401 and no end user is created in that tenant."""
    setup = tenant_factory()
    forged = setup.api_key.rsplit("_", 1)[0] + "_not-the-secret"
    for _ in range(2):  # the first loads the key into the cache, the second finds it there
        with pytest.raises(openai.AuthenticationError):
            _client(parley, forged).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], user="mallory"
            )
    assert not EndUser.objects.filter(tenant=setup.tenant, external_id="mallory").exists()
    assert sim.stats.requests == 0
