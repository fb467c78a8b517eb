"""The response cache on `/v1`: an API key that opts in gets a repeated request (temperature 0,
or `X-Parley-Cache: on`) answered with the stored completion, streamed or not, with no upstream
call and a $0 `cached` ledger row; a key that did not opt in always reaches the model."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from billing.models import CapPeriod, Reservation, UsageRecord
from billing.services import price_for
from responsecache.models import CachedAnswer
from tenants.models import ApiKey

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "What is your refund policy?"}]


def _client(parley, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=parley.openai_base_url, api_key=api_key, max_retries=0)


def _opted_in(tenant_factory):
    setup = tenant_factory()
    ApiKey.objects.filter(tenant=setup.tenant).update(response_cache=True)
    return setup


def _kinds(tenant) -> list[str]:
    return list(UsageRecord.objects.filter(tenant=tenant).order_by("created_at").values_list("kind", flat=True))


def test_an_opted_in_keys_repeated_request_is_answered_from_the_cache(parley, tenant_factory, sim):
    setup = _opted_in(tenant_factory)
    client = _client(parley, setup.api_key)
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, temperature=0, user="alice"
    )
    assert first.headers["x-parley-cache"] == "miss"
    # Another end user, the same request: `user` is not part of the key.
    again = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0, user="bob")

    assert again.headers["x-parley-cache"] == "hit"
    assert sim.stats.completions == 1
    original, cached = first.parse(), again.parse()
    assert cached.id != original.id and cached.id.startswith("chatcmpl-")
    assert cached.choices[0].message.content == original.choices[0].message.content
    assert cached.choices[0].finish_reason == "stop"
    assert cached.usage.completion_tokens == original.usage.completion_tokens
    assert _kinds(setup.tenant) == ["completion", "cached"]
    row = UsageRecord.objects.get(tenant=setup.tenant, kind="cached")
    assert row.cost_usd == 0 and row.end_user.external_id == "bob" and row.api_key_id is not None
    saved = price_for(MODEL).cost(prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens)
    assert row.saved_response_cache_usd == saved > 0

    # Streamed, the same stored completion arrives as chunks, usage included when asked.
    stream = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == original.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == original.usage.completion_tokens
    assert sim.stats.completions == 1 and _kinds(setup.tenant) == ["completion", "cached", "cached"]


def test_a_streamed_miss_is_kept_and_answers_a_plain_request(parley, tenant_factory, sim):
    setup = _opted_in(tenant_factory)
    client = _client(parley, setup.api_key)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, stream=True)
        if c.choices
    )
    cached = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)

    assert cached.choices[0].message.content == streamed and sim.stats.completions == 1
    assert CachedAnswer.objects.get(tenant=setup.tenant).question == MESSAGES[0]["content"]


def test_only_temperature_zero_or_the_header_is_cached(parley, tenant_factory, sim):
    setup = _opted_in(tenant_factory)
    client = _client(parley, setup.api_key)
    for _ in range(2):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.7)
    assert sim.stats.completions == 2

    asked = {"X-Parley-Cache": "on"}
    client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.7, extra_headers=asked)
    again = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, temperature=0.7, extra_headers=asked
    )
    assert again.headers["x-parley-cache"] == "hit" and sim.stats.completions == 3
    # Another body (another temperature) is another key.
    client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)
    assert sim.stats.completions == 4


def test_a_key_that_did_not_opt_in_always_reaches_the_model(parley, tenant_factory, sim):
    setup = tenant_factory()
    client = _client(parley, setup.api_key)
    first = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, temperature=0)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, extra_headers={"X-Parley-Cache": "on"})

    assert "x-parley-cache" not in first.headers
    assert sim.stats.completions == 2 and _kinds(setup.tenant) == ["completion", "completion"]
    assert not CachedAnswer.objects.exists()


def test_another_tenants_identical_request_is_a_miss(parley, tenant_factory, sim):
    one, two = _opted_in(tenant_factory), _opted_in(tenant_factory)
    _client(parley, one.api_key).chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)
    other = _client(parley, two.api_key).chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, temperature=0
    )

    assert other.headers["x-parley-cache"] == "miss" and sim.stats.completions == 2
    assert _kinds(two.tenant) == ["completion"]


def test_a_hit_gives_its_hold_back_and_spends_nothing(parley, tenant_factory, sim):
    setup = tenant_factory(monthly_cap_usd=Decimal("5"))
    ApiKey.objects.filter(tenant=setup.tenant).update(response_cache=True)
    client = _client(parley, setup.api_key)
    client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0)
    spent = UsageRecord.objects.get(tenant=setup.tenant).cost_usd
    upstream_requests = sim.stats.requests
    for stream in (False, True):
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, stream=stream)
        if stream:
            list(reply)

    assert sim.stats.requests == upstream_requests  # no upstream call for either hit
    assert _kinds(setup.tenant) == ["completion", "cached", "cached"]
    assert CapPeriod.objects.get(tenant=setup.tenant).spent_usd == spent
    # Nothing is held for a call any more (a web process's cap lease may still be: it is not a call's).
    assert not Reservation.objects.filter(tenant=setup.tenant, status="held").exclude(call_id__startswith="lease-").exists()
