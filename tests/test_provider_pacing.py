"""The provider's own limits: Parley reads x-ratelimit-* and Retry-After and paces before the
provider refuses; a refusal it cannot wait out reaches /v1 clients as a 429 with Retry-After
(not a 502) and sockets as a `rate_limited` error frame. The simulator enforces a real limit."""

from __future__ import annotations

import time
import uuid

import openai
import pytest

from billing.models import UsageRecord
from llm import pacing
from tests.conftest import adb

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gpt-4o-mini"


def _tenant(tenant_factory):
    # A key of its own: the pacing state is per provider URL and key, and a live server process
    # keeps it between tests.
    return tenant_factory(provider_key=f"sk-pacing-{uuid.uuid4().hex}")


def _client(parley, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=parley.openai_base_url, api_key=api_key, max_retries=0)


def _ask(client: openai.OpenAI, content: str = "hi") -> str:
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}])
    return reply.choices[0].message.content


# --- units --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02), ("1h2m3.5s", 3723.5), ("2.5", 2.5), ("", None), ("soon", None)],
)
def test_reset_durations_are_read_in_gos_format(text, seconds):
    assert pacing.duration_seconds(text) == seconds


def test_the_pacing_key_names_the_url_and_a_fingerprint_never_the_key():
    key = pacing.pacing_key("https://api.openai.com/v1/", "sk-secret-value")
    assert key.startswith("https://api.openai.com/v1#") and "sk-secret-value" not in key
    assert key != pacing.pacing_key("https://api.openai.com/v1", "sk-other-value")


async def _waited_after(headers: dict[str, str], *, credential: str) -> float:
    """Seconds `wait_turn` held a call after the provider sent these headers."""
    key = pacing.pacing_key("http://provider.test/v1", credential)
    pacing.observe(key, headers, status=200, retry_after=None)
    started = time.monotonic()
    await pacing.wait_turn(key)
    return time.monotonic() - started


async def test_a_spent_window_waits_for_its_reset_and_a_far_retry_after_refuses_at_once(settings):
    settings.PROVIDER_PACING_MAX_WAIT = 2.0
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "300ms"}
    assert 0.25 <= await _waited_after(headers, credential="sk-a") < 1.5
    key = pacing.pacing_key("http://provider.test/v1", "sk-a")

    pacing.observe(key, {}, status=429, retry_after=30.0)
    started = time.monotonic()
    with pytest.raises(pacing.ProviderBusy) as busy:
        await pacing.wait_turn(key)
    assert time.monotonic() - started < 0.1 and 29 <= busy.value.retry_after <= 30


async def test_pacing_never_queues_longer_than_its_bound(settings):
    settings.PROVIDER_PACING_MAX_WAIT = 0.3
    headers = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"}
    # Then it goes, and the provider has the last word.
    assert 0.25 <= await _waited_after(headers, credential="sk-b") < 1.0


# --- through Parley, against the simulator ------------------------------------------------


def test_calls_wait_for_the_providers_reset_instead_of_being_refused(parley, tenant_factory, sim):
    sim.rate_limit(requests=3, window_s=3.0)  # three calls, then one more a second; 429s past that
    setup = _tenant(tenant_factory)
    client = _client(parley, setup.api_key)

    started = time.monotonic()
    answers = [_ask(client, f"call {n}") for n in range(3)]
    first_three = time.monotonic() - started
    answers.append(_ask(client, "call 3"))
    waited = time.monotonic() - started - first_three

    assert all(answer.startswith("You said: call") for answer in answers)
    # The simulator refused nothing: the fourth call was not sent into a 429 (without pacing it
    # would have been, and its two quick retries too).
    assert sim.stats.rate_limited == 0 and sim.stats.completions == 4
    if first_three < 1.5:  # the third answer said "0 left" (a slower machine drained one): it waited
        assert waited >= 1.0, (first_three, waited)
    assert UsageRecord.objects.filter(tenant=setup.tenant, outcome="ok").count() == 4


@pytest.mark.parametrize("date_form", [False, True], ids=["seconds", "http-date"])
def test_a_v1_client_gets_429_with_retry_after_when_the_provider_refuses_for_long(
    parley, tenant_factory, sim, date_form
):
    setup = _tenant(tenant_factory)
    sim.inject(status=429, retry_after=30, retry_after_date=date_form, times=10)

    with pytest.raises(openai.RateLimitError) as refused:
        _ask(_client(parley, setup.api_key))

    response = refused.value.response
    assert response.status_code == 429
    assert 28 <= int(response.headers["retry-after"]) <= 31
    assert refused.value.body["type"] == "rate_limit_error" and refused.value.code == "rate_limited"
    # Retry-After was further off than Parley may queue: the provider saw one call, not three.
    assert sim.stats.requests == 1

    # The next call does not knock on the provider's door while its Retry-After runs.
    with pytest.raises(openai.RateLimitError):
        _ask(_client(parley, setup.api_key))
    assert sim.stats.requests == 1


def test_a_provider_429_that_survives_the_retries_is_a_429_not_a_502(parley, tenant_factory, sim):
    setup = _tenant(tenant_factory)
    sim.inject(status=429, retry_after=0.01, times=10)

    with pytest.raises(openai.RateLimitError) as refused:
        _ask(_client(parley, setup.api_key))

    assert refused.value.response.status_code == 429
    assert int(refused.value.response.headers["retry-after"]) >= 1
    assert sim.stats.requests == 3  # the first try and UPSTREAM_MAX_RETRIES (2)


async def test_a_socket_gets_a_rate_limited_error_frame(tenant_factory, chat, sim):
    setup = await adb(_tenant)(tenant_factory)
    sim.inject(status=429, retry_after=30, times=10)
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("Hello")
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "rate_limited", error
    assert 29 <= error["retry_after"] <= 30 and "rate limit" in error["message"]
    assert sim.stats.requests == 1
