"""How `llm/` talks to an upstream: timeouts, the per-loop client cache, Retry-After and retries.

Shared by the SDK path (`gateway`) and the byte relay (`relay`), which differ only in what they
read off the wire. The policy, in one place: retry 429, 408, 5xx, timeouts and connection
failures with exponential backoff and jitter (or the provider's Retry-After, capped), at most
`UPSTREAM_MAX_RETRIES` times, and only before the first token: a half-read stream is never
retried. Each attempt first waits its turn under the provider's own limits (`llm.pacing`).
This module is the bottom of `llm/`: it imports nothing else of the project but `llm.pacing`
and the metrics.
"""

from __future__ import annotations

import asyncio
import random
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Generic, TypeVar

import httpx2
from django.conf import settings

from observability import metrics

from . import pacing

T = TypeVar("T")
C = TypeVar("C")


@dataclass(frozen=True)
class ProviderTarget:
    credential_id: int
    base_url: str
    api_key: str = field(repr=False)
    organization: str = ""
    version: float = 0.0  # the credential's updated_at: a changed key gets a new client

    def __repr__(self) -> str:  # never print the key, even by accident
        return f"ProviderTarget({self.credential_id}, {self.base_url})"


class UpstreamError(Exception):
    """A failed upstream call, mapped to a contract error code."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "upstream_error",
        status: int | None = None,
        retry_after: float | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.retry_after = retry_after
        self.retryable = retryable


# --- timeouts -----------------------------------------------------------------------------


def timeout() -> httpx2.Timeout:
    """Connect, write and pool waits are short; a read may wait for a slow token."""
    return httpx2.Timeout(
        connect=settings.UPSTREAM_CONNECT_TIMEOUT,
        read=settings.UPSTREAM_READ_TIMEOUT,
        write=settings.UPSTREAM_CONNECT_TIMEOUT,
        pool=settings.UPSTREAM_CONNECT_TIMEOUT,
    )


def first_token_deadline() -> asyncio.Timeout:
    """Bounds one attempt up to its first token (providers send headers with it)."""
    return asyncio.timeout(settings.UPSTREAM_FIRST_TOKEN_TIMEOUT)


# --- clients ------------------------------------------------------------------------------


class ClientCache(Generic[C]):
    """One client per credential version, per event loop.

    Clients hold connection pools bound to the loop that opened them, so the cache is per loop
    (Daphne has one; tests and Celery's asyncio.run make others) and entries die with the loop.
    A credential whose key or URL changed gets a new client; its old one is dropped."""

    def __init__(self, build: Callable[[ProviderTarget], C]) -> None:
        self._build = build
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, C]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, target: ProviderTarget) -> C:
        per_loop = self._loops.setdefault(asyncio.get_running_loop(), {})
        key = (target.credential_id, target.version, target.base_url)
        client = per_loop.get(key)
        if client is None:
            for stale in [k for k in per_loop if k[0] == target.credential_id]:
                per_loop.pop(stale)
            client = per_loop[key] = self._build(target)
        return client


# --- retries ------------------------------------------------------------------------------


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the provider asks us to wait: `retry-after-ms` (OpenAI's), else `Retry-After` in
    either of its forms (delta-seconds or an HTTP date); None when absent or unusable."""
    if headers is None:
        return None
    try:
        if (milliseconds := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(milliseconds) / 1000)
    except ValueError:
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def provider_refusal(status: int, message: str, headers: Mapping[str, str] | None) -> UpstreamError:
    """The provider answered `status`: the error, read by the one retry policy. A 429 is the
    provider's rate limit: `rate_limited` (a 429 with Retry-After on /v1), not a 502."""
    return UpstreamError(
        message,
        code="rate_limited" if status == 429 else "upstream_error",
        status=status,
        retry_after=retry_after(headers),
        retryable=is_retryable_status(status),
    )


def is_retryable_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


def backoff_delay(attempt: int, retry_after: float | None) -> float:
    """How long to wait before retry number `attempt + 1`: the provider's word, else
    exponential backoff with jitter; never more than UPSTREAM_RETRY_MAX_DELAY."""
    delay = retry_after
    if delay is None:
        delay = settings.UPSTREAM_RETRY_BASE_DELAY * (2**attempt) * (0.5 + random.random())
    return min(delay, settings.UPSTREAM_RETRY_MAX_DELAY)


def failure_kind(error: UpstreamError) -> str:
    """For the metrics: the provider's status, or what kept it from answering."""
    if error.status is not None:
        return str(error.status)
    if error.code == "upstream_timeout":
        return "timeout"
    return "connection" if error.retryable else "other"


async def with_retries(attempt_once: Callable[[], Awaitable[T]], *, target: ProviderTarget | None = None) -> T:
    """Run `attempt_once` until it succeeds, raises a non-retryable UpstreamError, or the
    retries run out. `attempt_once` maps its own failures to UpstreamError. With a `target`,
    every attempt first waits its turn under that provider's limits, and every failed attempt
    is counted by the target's host (observability.metrics)."""
    key = pacing.pacing_key(target.base_url, target.api_key) if target is not None else None
    attempt = 0
    while True:
        try:
            if key is not None:
                await paced(key)
            return await attempt_once()
        except UpstreamError as error:
            retried = error.retryable and attempt < settings.UPSTREAM_MAX_RETRIES
            metrics.upstream_failed(target.base_url if target else "", failure_kind(error), retried=retried)
            if not retried:
                if error.code == "rate_limited" and error.retry_after is None:
                    # The client is told when to come back, even when the provider did not say.
                    error.retry_after = max(pacing.wait_known(key) if key else 0.0, 1.0)
                raise
            await asyncio.sleep(backoff_delay(attempt, error.retry_after))
            attempt += 1


async def paced(key: str) -> None:
    """Wait for the provider's limits (llm.pacing); a wait too long to queue is a 429 now."""
    try:
        await pacing.wait_turn(key)
    except pacing.ProviderBusy as busy:
        raise UpstreamError(str(busy), code="rate_limited", status=429, retry_after=busy.retry_after) from None
