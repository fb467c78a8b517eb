"""llm/transport.py: the one retry policy, Retry-After parsing and client cache of the SDK path and the relay."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from llm import gateway, relay, transport
from llm.transport import ProviderTarget, UpstreamError


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("3", 3.0), ("0.25", 0.25), ("-4", 0.0), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), ("soon", None), (None, None)],
)
def test_retry_after_reads_delta_seconds_and_ignores_what_it_cannot_use(header, seconds):
    headers = {} if header is None else {"retry-after": header}
    assert transport.retry_after(headers) == seconds
    assert transport.retry_after(None) is None


def test_retry_after_reads_the_http_date_form():
    when = datetime.now(UTC) + timedelta(seconds=30)
    waited = transport.retry_after({"retry-after": format_datetime(when, usegmt=True)})
    assert 28 <= waited <= 30


def test_retry_after_ms_is_preferred_to_retry_after():
    assert transport.retry_after({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert transport.retry_after({"retry-after-ms": "junk", "retry-after": "2"}) == 2.0


def test_a_provider_429_is_rate_limited_and_other_statuses_upstream_errors():
    limited = transport.provider_refusal(429, "429", {"retry-after": "3"})
    assert (limited.code, limited.status, limited.retry_after, limited.retryable) == ("rate_limited", 429, 3.0, True)
    assert transport.provider_refusal(503, "503", None).code == "upstream_error"


def test_retryable_statuses_are_429_408_and_5xx():
    assert [s for s in (400, 401, 403, 404, 408, 413, 422, 429, 500, 502, 503, 504) if transport.is_retryable_status(s)] == [
        408, 429, 500, 502, 503, 504
    ]


def test_backoff_is_exponential_with_jitter_and_capped(settings):
    settings.UPSTREAM_RETRY_BASE_DELAY = 1.0
    settings.UPSTREAM_RETRY_MAX_DELAY = 5.0
    for attempt in range(3):
        delay = transport.backoff_delay(attempt, None)
        assert 0.5 * 2**attempt <= delay <= min(1.5 * 2**attempt, 5.0)
    assert transport.backoff_delay(10, None) == 5.0
    assert transport.backoff_delay(0, 2.0) == 2.0  # the provider's word wins
    assert transport.backoff_delay(0, 60.0) == 5.0  # but never past the cap


def _run(attempt_once):
    return asyncio.run(transport.with_retries(attempt_once))


def test_retries_retryable_errors_up_to_the_limit_then_raises(settings):
    settings.UPSTREAM_MAX_RETRIES = 2
    calls = []

    async def failing():
        calls.append(1)
        raise UpstreamError("503", status=503, retry_after=0, retryable=True)

    with pytest.raises(UpstreamError):
        _run(failing)
    assert len(calls) == 3  # the first try and two retries


def test_a_non_retryable_error_is_raised_at_once(settings):
    calls = []

    async def refused():
        calls.append(1)
        raise UpstreamError("400", status=400)

    with pytest.raises(UpstreamError):
        _run(refused)
    assert calls == [1]


def test_a_retry_that_succeeds_returns_its_result(settings):
    outcomes = [UpstreamError("429", status=429, retry_after=0, retryable=True), "answer"]

    async def flaky():
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert _run(flaky) == "answer"


def test_both_paths_share_one_client_per_credential_version_and_loop():
    target = ProviderTarget(credential_id=7, base_url="http://127.0.0.1:1/v1", api_key="sk-x", version=1.0)
    rotated = ProviderTarget(credential_id=7, base_url="http://127.0.0.1:1/v1", api_key="sk-y", version=2.0)

    async def clients():
        first = gateway.client_for(target)
        assert gateway.client_for(target) is first
        assert gateway.client_for(rotated) is not first  # a changed key gets a new client
        return first, relay._clients.get(target), relay._clients.get(target)

    one, relayed, again = asyncio.run(clients())
    assert relayed is again
    other_loop, _, _ = asyncio.run(clients())
    assert other_loop is not one  # pools are loop-bound: a new loop, a new client


def test_status_errors_of_both_paths_carry_the_same_policy():
    import httpx2

    response = httpx2.Response(429, headers={"retry-after": "2"})
    mapped = relay.status_error(response, b"")
    assert (mapped.retryable, mapped.retry_after, mapped.status) == (True, 2.0, 429)
    assert not relay.status_error(httpx2.Response(400), b"").retryable
