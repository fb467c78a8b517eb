"""Rate limits per end user, per tenant (requests and tokens a minute) and per API key.

Backed by the `limits` library: Redis in services mode, so a limit holds across every web
process; memory in embedded mode. Sliding-window counters keep a token limit cheap (a hit of
cost N is one counter increment, not N entries).

Every limit of a call is acquired at once, all or nothing: a request one limit refuses counts
against none (an end user over their own limit does not eat the tenant's). On Redis that is one
script, `ACQUIRE_ALL`: `limits`' own sliding-window counter (its keys, its arithmetic, so its
`get_window_stats` reads what we counted) checking every limit before counting any, in one
round trip. `rate_limits_acquire_async` runs it from the event loop with other reads in the
same pipeline (the configuration versions of `tenants.freshness`) for `/v1`;
`rate_limits_acquire_reading` does the same from a database thread for socket and REST
turns, before the turn locks its conversation.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from django.conf import settings
from limits import RateLimitItemPerMinute
from limits.storage import RedisStorage, Storage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter
from redis.exceptions import NoScriptError

from .callers import Caller


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
        from config.redis_options import redis_options

        return storage_from_string(settings.REDIS_URL, key_prefix="parley-limits", **redis_options(asynchronous=False))
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
class Limits:
    """A caller's limits a minute, as its tenant and key configure them (cached configuration)."""

    end_user_rpm: int
    tenant_rpm: int
    tenant_tpm: int
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


def checks_for(caller: Caller, limits: Limits, *, requests: bool = True, tokens: int = 0) -> list[Check]:
    checks = []
    if requests:
        checks.append(Check("requests per tenant", limits.tenant_rpm, ("t", str(caller.tenant_id), "rpm"), 1))
        if caller.end_user_id is not None:
            checks.append(Check("requests per end user", limits.end_user_rpm, ("u", str(caller.end_user_id)), 1))
        if caller.api_key_id is not None and limits.api_key_rpm:
            checks.append(Check("requests per API key", limits.api_key_rpm, ("k", str(caller.api_key_id)), 1))
    if tokens:
        checks.append(Check("tokens per tenant", limits.tenant_tpm, ("t", str(caller.tenant_id), "tpm"), tokens))
    return checks


# limits' acquire_sliding_window.lua, for every limit of the call: shift expired windows, check
# them all, then count them all. KEYS: previous and current window key of each limit;
# ARGV: limit, expiry (s) and amount of each. Returns {i, ms until it grows} for the first limit
# i that refuses (nothing counted), or {0, remaining, ms until it grows, …} for every limit
# after counting: what limits' get_window_stats would say, in the same round trip.
ACQUIRE_ALL = """
local function window(previous, current, expiry)
    local previous_count = tonumber(redis.call('get', previous)) or 0
    local previous_ttl = math.max(tonumber(redis.call('pttl', previous)) or 0, 0)
    local current_count = tonumber(redis.call('get', current)) or 0
    local current_ttl = math.max(tonumber(redis.call('pttl', current)) or 0, 0)
    local reset = -1
    if previous_count > 0 then
        reset = previous_ttl % (expiry / previous_count)
    end
    if current_count > 0 and (reset < 0 or current_ttl % expiry < reset) then
        reset = current_ttl % expiry
    end
    return math.floor(previous_count * previous_ttl / expiry) + current_count, math.floor(reset)
end
local n = #KEYS / 2
for i = 1, n do
    local previous, current = KEYS[2 * i - 1], KEYS[2 * i]
    local limit = tonumber(ARGV[3 * i - 2])
    local expiry = tonumber(ARGV[3 * i - 1]) * 1000
    local amount = tonumber(ARGV[3 * i])
    local current_ttl = tonumber(redis.call('pttl', current))
    if current_ttl > 0 and current_ttl < expiry then
        redis.call('rename', current, previous)
        redis.call('set', current, 0, 'PX', current_ttl + expiry)
    end
    local weighted, reset = window(previous, current, expiry)
    if amount > limit or weighted + amount > limit then
        return {i, reset}
    end
end
local states = {0}
for i = 1, n do
    local previous, current = KEYS[2 * i - 1], KEYS[2 * i]
    local limit = tonumber(ARGV[3 * i - 2])
    local expiry = tonumber(ARGV[3 * i - 1]) * 1000
    local amount = tonumber(ARGV[3 * i])
    if redis.call('exists', current) == 1 then
        redis.call('incrby', current, amount)
    else
        redis.call('set', current, amount, 'PX', expiry * 2)
    end
    local weighted, reset = window(previous, current, expiry)
    table.insert(states, math.max(0, limit - weighted))
    table.insert(states, reset)
end
return states
"""
ACQUIRE_ALL_SHA = hashlib.sha1(ACQUIRE_ALL.encode()).hexdigest()  # what EVALSHA names it by


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
    return limits_storage().get_connection().register_script(ACQUIRE_ALL)


_memory_lock = threading.Lock()  # the event loop (/v1) and database threads (chats) both count


def _acquire_in_memory(checks: list[Check]) -> tuple[LimitState, ...]:
    """The same, on limits' in-memory storage (one process: test every limit, then hit)."""
    with _memory_lock:
        return _test_then_hit(checks)


def _test_then_hit(checks: list[Check]) -> tuple[LimitState, ...]:
    limiter = _limiter()
    for check in checks:
        if not limiter.test(check.item, *check.identifiers, cost=check.amount):
            reset_time, _ = limiter.get_window_stats(check.item, *check.identifiers)
            raise RateLimited(name=check.name, limit=check.limit, retry_after=reset_time - time.time())
    for check in checks:
        limiter.hit(check.item, *check.identifiers, cost=check.amount)
    now = time.time()
    states = []
    for check in checks:
        reset_time, remaining = limiter.get_window_stats(check.item, *check.identifiers)
        states.append(LimitState(check.name, check.limit, remaining, max(0.0, reset_time - now)))
    return tuple(states)


def _outcome(checks: list[Check], result: list[Any]) -> tuple[LimitState, ...]:
    """ACQUIRE_ALL's answer: each limit's state, or RateLimited with the one that refused."""
    values = [int(value) for value in result]
    if values[0]:
        check = checks[values[0] - 1]
        raise RateLimited(name=check.name, limit=check.limit, retry_after=max(0, values[1]) / 1000)
    return tuple(
        LimitState(check.name, check.limit, remaining, max(0, reset_ms) / 1000)
        for check, remaining, reset_ms in zip(checks, values[1::2], values[2::2], strict=True)
    )


def rate_limits_acquire(checks: list[Check]) -> tuple[LimitState, ...]:
    """Count every check, or none; returns each limit's state after counting. Raises
    RateLimited with the first limit that refuses."""
    if not checks:
        return ()
    storage = limits_storage()
    if not isinstance(storage, RedisStorage):
        return _acquire_in_memory(checks)
    keys, arguments = _script_arguments(storage, checks)
    return _outcome(checks, _acquire_all_script()(keys, arguments))


def rate_limits_acquire_reading(checks: list[Check], *, also_read: tuple[str, ...]) -> Acquired:
    """`rate_limits_acquire_async` from a database thread (socket and REST turns): every
    limit and the string keys `also_read`, in one Redis round trip (one pipeline)."""
    storage = limits_storage()
    if not isinstance(storage, RedisStorage):
        return Acquired(states=_acquire_in_memory(checks) if checks else (), read=())
    keys, arguments = _script_arguments(storage, checks)

    def round_trip() -> list[Any]:
        with storage.get_connection().pipeline(transaction=False) as pipe:
            pipe.mget(also_read)
            if checks:
                pipe.evalsha(ACQUIRE_ALL_SHA, len(keys), *keys, *arguments)
            return pipe.execute()

    try:
        results = round_trip()
    except NoScriptError:  # the script is not in this Redis's cache (first use, a restart)
        storage.get_connection().script_load(ACQUIRE_ALL)
        results = round_trip()
    read = tuple(value.decode() if isinstance(value, bytes) else (value or "") for value in results[0])
    return Acquired(states=_outcome(checks, results[-1]) if checks else (), read=read)


_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()


def _async_redis() -> Any:
    """One asyncio Redis client per event loop (its connections belong to the loop)."""
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        import redis.asyncio

        from config.redis_options import redis_options

        client = redis.asyncio.Redis.from_url(settings.REDIS_URL, **redis_options(asynchronous=True), socket_timeout=5)
        _async_clients[loop] = client
    return client


@dataclass(frozen=True)
class Acquired:
    states: tuple[LimitState, ...]  # each limit's state after counting, in the checks' order
    read: tuple[str, ...]  # the values of `also_read`


async def rate_limits_acquire_async(checks: list[Check], *, also_read: tuple[str, ...] = ()) -> Acquired:
    """`rate_limits_acquire` from the event loop, in one Redis round trip that also reads the
    string keys `also_read` ("" for a missing key). In embedded mode the in-memory counters are
    counted in place and nothing is read."""
    storage = limits_storage()
    if not isinstance(storage, RedisStorage):
        return Acquired(states=_acquire_in_memory(checks) if checks else (), read=())
    client = _async_redis()
    keys, arguments = _script_arguments(storage, checks)

    async def round_trip() -> list[Any]:
        async with client.pipeline(transaction=False) as pipe:
            if also_read:
                pipe.mget(also_read)
            if checks:
                pipe.evalsha(ACQUIRE_ALL_SHA, len(keys), *keys, *arguments)
            return await pipe.execute()

    try:
        results = await round_trip()
    except NoScriptError:  # the script is not in this Redis's cache (first use, a restart)
        await client.script_load(ACQUIRE_ALL)
        results = await round_trip()
    read = tuple(value.decode() if value else "" for value in results[0]) if also_read else ()
    return Acquired(states=_outcome(checks, results[-1]) if checks else (), read=read)


def rate_limit_hit(*, caller: Caller, limits: Limits, tokens: int = 0) -> tuple[LimitState, ...]:
    """Count one request against every request limit that applies and `tokens` against the
    tenant's token limit — all or nothing, in one Redis round trip. Raises RateLimited with the
    first limit that is full; returns each limit's state after counting (for headers)."""
    return rate_limits_acquire(checks_for(caller, limits, tokens=tokens))


def ratelimit_headers(states: tuple[LimitState, ...] | list[LimitState]) -> list[tuple[str, str]]:
    """OpenAI's `x-ratelimit-*` response headers: the tightest request limit that applied and
    the token limit, each with its limit, what remains and when it next grows."""
    headers: list[tuple[str, str]] = []
    requests = [state for state in states if state.name.startswith("requests")]
    tokens = [state for state in states if state.name.startswith("tokens")]
    for kind, group in (("requests", requests), ("tokens", tokens)):
        if group:
            tightest = min(group, key=lambda state: state.remaining)
            headers += [
                (f"x-ratelimit-limit-{kind}", str(tightest.limit)),
                (f"x-ratelimit-remaining-{kind}", str(tightest.remaining)),
                (f"x-ratelimit-reset-{kind}", f"{max(0.0, tightest.reset_after):.1f}s"),
            ]
    return headers


def rate_limits_reset() -> None:
    """Forget every counter (tests)."""
    limits_storage().reset()
