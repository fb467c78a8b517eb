"""Rate limits per end user, per tenant (requests and tokens a minute) and per API key.

Backed by the `limits` library: Redis in services mode, so a limit holds across every web
process; memory in embedded mode. Sliding-window counters keep a token limit cheap (a hit of
cost N is one counter increment, not N entries).

Every limit of a call is acquired at once, all or nothing: a request one limit refuses counts
against none (an end user over their own limit does not eat the tenant's). On Redis that is one
script, `ACQUIRE_ALL`: `limits`' own sliding-window counter (its keys, its arithmetic, so its
`get_window_stats` reads what we counted) checking every limit before counting any, in one
round trip. `rate_limits_acquire_async` runs it from the event loop with other reads in the
same pipeline (the configuration versions of `tenants.freshness`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from django.conf import settings
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage, Storage, storage_from_string
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


@dataclass(frozen=True)
class Check:
    """One limit a call counts against: `cost` of `limit` a minute under `identifiers`."""

    name: str
    limit: int
    identifiers: tuple[str, ...]
    cost: int

    @property
    def item(self) -> RateLimitItemPerMinute:
        return RateLimitItemPerMinute(self.limit)

    @property
    def amount(self) -> int:
        return min(self.cost, self.limit)  # a cost over the limit could never be admitted


def checks_for(caller: Caller, *, requests: bool = True, tokens: int = 0) -> list[Check]:
    checks = []
    if requests:
        checks.append(Check("requests per tenant", caller.tenant_rpm, ("t", str(caller.tenant_id), "rpm"), 1))
        if caller.end_user_id is not None:
            checks.append(Check("requests per end user", caller.end_user_rpm, ("u", str(caller.end_user_id)), 1))
        if caller.api_key_id is not None and caller.api_key_rpm:
            checks.append(Check("requests per API key", caller.api_key_rpm, ("k", str(caller.api_key_id)), 1))
    if tokens:
        checks.append(Check("tokens per tenant", caller.tenant_tpm, ("t", str(caller.tenant_id), "tpm"), tokens))
    return checks


# limits' acquire_sliding_window.lua, for every limit of the call: shift expired windows, check
# them all, then count them all. KEYS: previous and current window key of each limit;
# ARGV: limit, expiry (s) and amount of each. Returns 0, or the 1-based index of the first
# limit that refuses (nothing counted).
ACQUIRE_ALL = """
local n = #KEYS / 2
for i = 1, n do
    local previous, current = KEYS[2 * i - 1], KEYS[2 * i]
    local limit = tonumber(ARGV[3 * i - 2])
    local expiry = tonumber(ARGV[3 * i - 1]) * 1000
    local amount = tonumber(ARGV[3 * i])
    if amount > limit then
        return i
    end
    local current_ttl = tonumber(redis.call('pttl', current))
    if current_ttl > 0 and current_ttl < expiry then
        redis.call('rename', current, previous)
        redis.call('set', current, 0, 'PX', current_ttl + expiry)
    end
    local previous_count = tonumber(redis.call('get', previous)) or 0
    local previous_ttl = tonumber(redis.call('pttl', previous)) or 0
    local current_count = tonumber(redis.call('get', current)) or 0
    if previous_ttl <= 0 then
        previous_ttl = 0
    end
    if math.floor(previous_count * previous_ttl / expiry) + current_count + amount > limit then
        return i
    end
end
for i = 1, n do
    local current = KEYS[2 * i]
    local amount = tonumber(ARGV[3 * i])
    if redis.call('exists', current) == 1 then
        redis.call('incrby', current, amount)
    else
        redis.call('set', current, amount, 'PX', tonumber(ARGV[3 * i - 1]) * 2000)
    end
end
return 0
"""


def _script_arguments(storage: RedisStorage, checks: list[Check]) -> tuple[list[str], list[int]]:
    keys: list[str] = []
    arguments: list[int] = []
    for check in checks:
        item = check.item
        key = item.key_for(*check.identifiers)
        keys += [storage.prefixed_key(storage._previous_window_key(key)),
                 storage.prefixed_key(storage._current_window_key(key))]
        arguments += [check.limit, item.get_expiry(), check.amount]
    return keys, arguments


@lru_cache(maxsize=1)
def _acquire_all_script() -> Any:
    storage = limits_storage()
    return storage.get_connection().register_script(ACQUIRE_ALL)


def _acquire_in_memory(checks: list[Check]) -> int:
    limiter = _limiter()
    for index, check in enumerate(checks, start=1):
        if not limiter.test(check.item, *check.identifiers, cost=check.amount):
            return index
    for check in checks:
        limiter.hit(check.item, *check.identifiers, cost=check.amount)
    return 0


def _refusal(check: Check) -> RateLimited:
    reset_time, _ = _limiter().get_window_stats(check.item, *check.identifiers)
    return RateLimited(name=check.name, limit=check.limit, retry_after=reset_time - time.time())


def rate_limits_acquire(checks: list[Check]) -> None:
    """Count every check, or none. Raises RateLimited with the first limit that refuses."""
    if not checks:
        return
    storage = limits_storage()
    if isinstance(storage, RedisStorage):
        keys, arguments = _script_arguments(storage, checks)
        refused = int(_acquire_all_script()(keys, arguments))
    else:
        refused = _acquire_in_memory(checks)
    if refused:
        raise _refusal(checks[refused - 1])


_async_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any]" = weakref.WeakKeyDictionary()


def _async_redis() -> Any:
    """One asyncio Redis client per event loop (its connections belong to the loop)."""
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
        _async_clients[loop] = client
    return client


async def rate_limits_acquire_async(checks: list[Check], *, also_read: tuple[str, ...] = ()) -> tuple[str, ...]:
    """`rate_limits_acquire` from the event loop, in one Redis round trip that also reads the
    string keys `also_read` (returned, "" for a missing key). In embedded mode the in-memory
    counters are counted in place and nothing is read."""
    storage = limits_storage()
    if not isinstance(storage, RedisStorage):
        if checks and (refused := _acquire_in_memory(checks)):
            raise _refusal(checks[refused - 1])
        return ()
    client = _async_redis()
    keys, arguments = _script_arguments(storage, checks)
    async with client.pipeline(transaction=False) as pipe:
        if also_read:
            pipe.mget(also_read)
        if checks:
            pipe.evalsha(_acquire_all_sha(), len(keys), *keys, *arguments)
        try:
            results = await pipe.execute()
        except Exception as error:  # the script is not cached on this Redis (a restart): load it
            if "NOSCRIPT" not in str(error):
                raise
            await client.script_load(ACQUIRE_ALL)
            results = await pipe.execute()
    read = tuple(value.decode() if value else "" for value in results[0]) if also_read else ()
    refused = int(results[-1]) if checks else 0
    if refused:
        raise await asyncio.to_thread(_refusal, checks[refused - 1])
    return read


@lru_cache(maxsize=1)
def _acquire_all_sha() -> str:
    return _acquire_all_script().sha


def rate_limit_hit(*, caller: Caller, tokens: int = 0, with_states: bool = False) -> list[LimitState]:
    """Count one request against every request limit that applies or, with `tokens`, that many
    tokens against the tenant's token limit — all or nothing. Raises RateLimited with the first
    limit that is full. With `with_states`, returns each limit's state (one more round trip per
    limit) for response headers."""
    checks = checks_for(caller, requests=not tokens, tokens=tokens)
    rate_limits_acquire(checks)
    if not with_states:
        return []
    limiter = _limiter()
    states = []
    for check in checks:
        reset_time, remaining = limiter.get_window_stats(check.item, *check.identifiers)
        states.append(LimitState(name=check.name, limit=check.limit, remaining=remaining,
                                 reset_after=max(0.0, reset_time - time.time())))
    return states


def rate_limits_reset() -> None:
    """Forget every counter (tests)."""
    limits_storage().reset()
