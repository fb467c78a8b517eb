"""Rate limits per end user, per tenant (requests and tokens a minute) and per API key.

Backed by the `limits` library: Redis in services mode, so a limit holds across every web
process; memory in embedded mode. Sliding-window counters keep a token limit cheap (a hit of
cost N is one counter increment, not N entries).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings
from limits import RateLimitItemPerMinute
from limits.storage import Storage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter


class RateLimited(Exception):
    def __init__(self, *, name: str, limit: int, retry_after: float) -> None:
        self.name = name
        self.limit = limit
        self.retry_after = max(1.0, round(retry_after, 1))
        super().__init__(f"rate limit exceeded: {limit} {name} a minute; retry in {self.retry_after:g} s")


@lru_cache(maxsize=1)
def limits_storage() -> Storage:
    """Where every counter lives: Redis in services mode, process memory when embedded."""
    if settings.REDIS_URL:
        return storage_from_string(settings.REDIS_URL, key_prefix="parley-limits")
    return storage_from_string("memory://")


def _limiter() -> SlidingWindowCounterRateLimiter:
    return SlidingWindowCounterRateLimiter(limits_storage())


@dataclass(frozen=True)
class LimitState:
    name: str
    limit: int
    remaining: int
    reset_after: float


@dataclass(frozen=True)
class Caller:
    tenant_id: int
    end_user_rpm: int
    tenant_rpm: int
    tenant_tpm: int
    end_user_id: uuid.UUID | None = None
    api_key_id: int | None = None
    api_key_rpm: int | None = None


def _checks(caller: Caller, tokens: int) -> list[tuple[str, int, tuple[str, ...], int]]:
    if tokens:
        return [("tokens per tenant", caller.tenant_tpm, ("t", str(caller.tenant_id), "tpm"), tokens)]
    checks = [("requests per tenant", caller.tenant_rpm, ("t", str(caller.tenant_id), "rpm"), 1)]
    if caller.end_user_id is not None:
        checks.append(("requests per end user", caller.end_user_rpm, ("u", str(caller.end_user_id)), 1))
    if caller.api_key_id is not None and caller.api_key_rpm:
        checks.append(("requests per API key", caller.api_key_rpm, ("k", str(caller.api_key_id)), 1))
    return checks


def rate_limit_hit(*, caller: Caller, tokens: int = 0, with_states: bool = False) -> list[LimitState]:
    """Count one request against every request limit that applies or, with `tokens`, that many
    tokens against the tenant's token limit. Raises RateLimited with the first limit that is
    full. With `with_states`, returns each limit's state (one more round trip per limit) for
    response headers."""
    limiter = _limiter()
    states = []
    for name, limit, identifiers, cost in _checks(caller, tokens):
        item = RateLimitItemPerMinute(limit)
        if not limiter.hit(item, *identifiers, cost=min(cost, limit)):
            reset_time, _ = limiter.get_window_stats(item, *identifiers)
            raise RateLimited(name=name, limit=limit, retry_after=reset_time - time.time())
        if not with_states:
            continue
        reset_time, remaining = limiter.get_window_stats(item, *identifiers)
        states.append(LimitState(name=name, limit=limit, remaining=remaining, reset_after=max(0.0, reset_time - time.time())))
    return states


def rate_limits_reset() -> None:
    """Forget every counter (tests)."""
    limits_storage().reset()
