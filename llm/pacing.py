"""Pacing before the provider's own rate limits: what its `x-ratelimit-*` headers say, per credential.

OpenAI answers every call with how many requests and tokens the key has left in its window and
when each resets (`x-ratelimit-remaining-requests: 3`, `x-ratelimit-reset-requests: 6m0s`; the
durations are Go's: "1s", "6m0s", "20ms"). A call about to go out while either is at or below
its floor (PROVIDER_PACING_REQUEST_FLOOR, PROVIDER_PACING_TOKEN_FLOOR) waits until the reset,
and so does every call after a 429 until its Retry-After has passed; never longer than
PROVIDER_PACING_MAX_WAIT (then it goes, and the provider decides). A 429's Retry-After further
off than that refuses the call at once (`ProviderBusy`): the caller gets a 429 with Retry-After
instead of a socket that hangs.

Keyed by the provider's base URL and a fingerprint of the key (never the key): two credentials
holding the same key share the provider's limit. The state is per process (no I/O on the hot
path); each process also counts the calls it sends since the last header, so concurrent calls
of one process do not all spend the same last request. Several processes sharing one key can
still overrun it together: the retries (Retry-After honoured) absorb that.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

from django.conf import settings

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|h|m|s)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ProviderBusy(Exception):
    """The provider's limit will not reset within PROVIDER_PACING_MAX_WAIT."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the model provider's rate limit is reached; retry after {retry_after:.1f} s")
        self.retry_after = retry_after


def duration_seconds(text: str | None) -> float | None:
    """Seconds in a Go-style duration ("1s", "6m0s", "20ms", "1h2m3.5s"); None when unusable."""
    if not text:
        return None
    text = text.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        try:  # some compatible servers send plain seconds
            return max(0.0, float(text))
        except ValueError:
            return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _count(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def pacing_key(base_url: str, api_key: str) -> str:
    fingerprint = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    return f"{base_url.rstrip('/')}#{fingerprint}"


@dataclass
class _Budget:
    """One of the provider's windows (requests or tokens): what is left, until when."""

    remaining: int | None = None
    resets_at: float = 0.0  # monotonic

    def observe(self, remaining: int | None, reset: float | None, now: float) -> None:
        if remaining is None:
            return
        self.remaining = remaining
        self.resets_at = now + (reset or 0.0)

    def wait(self, floor: int, now: float) -> float:
        if self.remaining is None or now >= self.resets_at:
            self.remaining = None  # the window reset: unknown until the next answer says
            return 0.0
        return self.resets_at - now if self.remaining <= floor else 0.0


@dataclass
class ProviderWindow:
    """What one credential's provider last said about its limits."""

    requests: _Budget
    tokens: _Budget
    blocked_until: float = 0.0  # after a 429: its Retry-After

    def wait(self, now: float) -> float:
        return max(
            self.blocked_until - now,
            self.requests.wait(settings.PROVIDER_PACING_REQUEST_FLOOR, now),
            self.tokens.wait(settings.PROVIDER_PACING_TOKEN_FLOOR, now),
            0.0,
        )

    def spend_one(self) -> None:
        if self.requests.remaining is not None:
            self.requests.remaining -= 1


_windows: dict[str, ProviderWindow] = {}


def window(key: str) -> ProviderWindow:
    found = _windows.get(key)
    if found is None:
        found = _windows[key] = ProviderWindow(_Budget(), _Budget())
    return found


def observe(key: str, headers: Mapping[str, str], *, status: int, retry_after: float | None) -> None:
    """Record what an answer's headers say (any status; a 429 also blocks until Retry-After)."""
    now = time.monotonic()
    state = window(key)
    state.requests.observe(
        _count(headers.get("x-ratelimit-remaining-requests")),
        duration_seconds(headers.get("x-ratelimit-reset-requests")), now,
    )
    state.tokens.observe(
        _count(headers.get("x-ratelimit-remaining-tokens")),
        duration_seconds(headers.get("x-ratelimit-reset-tokens")), now,
    )
    if status == 429:
        state.blocked_until = max(state.blocked_until, now + (retry_after if retry_after is not None else 1.0))


def wait_known(key: str) -> float:
    """How long the provider's limits say the next call should wait (0 when free to go)."""
    return window(key).wait(time.monotonic())


async def wait_turn(key: str) -> None:
    """Wait until the provider's limits let a call through (at most PROVIDER_PACING_MAX_WAIT:
    then the call goes anyway, and the provider has the last word), then count it as sent.

    Raises ProviderBusy when a 429's Retry-After is further off than PROVIDER_PACING_MAX_WAIT:
    that call would be refused, so it is not sent."""
    if not settings.PROVIDER_PACING:
        return
    state = window(key)
    now = time.monotonic()
    deadline = now + settings.PROVIDER_PACING_MAX_WAIT
    while (delay := state.wait(now)) > 0 and now < deadline:
        if state.blocked_until - now > settings.PROVIDER_PACING_MAX_WAIT:
            raise ProviderBusy(state.blocked_until - now)
        await asyncio.sleep(min(delay, deadline - now))
        now = time.monotonic()
    state.spend_one()


def windows_forget() -> None:
    """Tests: every provider starts unknown."""
    _windows.clear()
