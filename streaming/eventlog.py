"""The event log: each conversation's generation events, ordered, with offsets, capped and expiring.

A generation appends every event it publishes; every reader (socket, SSE, the REST wait, the
stale-generation sweep) reads from an offset of its own. Appending never waits for a reader, a
reader that falls behind catches up from its offset instead of losing events, and a
reconnecting client resumes from the last offset it saw. In services mode the log is a Redis
Stream per conversation (XADD with an approximate MAXLEN, EXPIRE refreshed on every append,
XREAD BLOCK to wait); in embedded mode it is a list per key in this process.

Offsets are strings `MS-SEQ` (Redis stream ids); `START` is before the first event.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

from django.conf import settings

START = "0-0"
OFFSET_PATTERN = re.compile(r"^\d{1,20}-\d{1,20}$")

Entry = tuple[str, dict[str, Any]]


def _log_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    return (RedisError, OSError)


# What a read or append raises while Redis is away (readers retry from their offset).
LOG_ERRORS = _log_errors()


def log_key(group: str) -> str:
    """The log of one conversation (`group` names it with its tenant)."""
    return f"parley:log:{group}"


class EventLog(Protocol):
    async def append(self, key: str, event: dict[str, Any]) -> str:
        """Add an event at the end; returns its offset. Never waits for readers."""

    async def read(self, key: str, after: str, *, block_ms: int = 0, count: int = 1000) -> list[Entry]:
        """Up to `count` events after offset `after`, oldest first; with `block_ms`, wait that
        long for one when there are none yet ([] on timeout)."""

    async def read_many(self, positions: dict[str, str], *, block_ms: int = 0, count: int = 100) -> dict[str, list[Entry]]:
        """`read` over several logs at once (each after its own offset): the logs that have
        events, up to `count` each; with `block_ms`, wait that long for any one of them."""

    async def head(self, key: str) -> str:
        """The offset of the last event (START when the log is empty or gone)."""


def offset_key(offset: str) -> tuple[int, int]:
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq or 0)


# --- embedded: this process's memory ------------------------------------------------------


@dataclass
class _Stream:
    seqs: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    last_seq: int = 0
    expires_at: float = 0.0
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=list)


class MemoryEventLog:
    """The in-process log. Readers may sit on other event loops (the embedded test server runs
    in a thread of its own), so waits are per-loop futures woken thread-safely, under a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}

    def _stream(self, key: str, now: float) -> _Stream | None:
        stream = self._streams.get(key)
        if stream is not None and stream.expires_at < now:
            del self._streams[key]
            return None
        return stream

    async def append(self, key: str, event: dict[str, Any]) -> str:
        now = time.monotonic()
        with self._lock:
            stream = self._stream(key, now) or self._streams.setdefault(key, _Stream())
            stream.last_seq += 1
            stream.seqs.append(stream.last_seq)
            stream.events.append(event)
            excess = len(stream.seqs) - settings.EVENT_LOG_MAXLEN
            if excess > 0:
                del stream.seqs[:excess], stream.events[:excess]
            stream.expires_at = now + settings.EVENT_LOG_TTL_SECONDS
            waiters, stream.waiters = stream.waiters, []
            offset = f"0-{stream.last_seq}"
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_wake, waiter)
        return offset

    def _take(self, key: str, after: str, count: int) -> list[Entry]:
        stream = self._stream(key, time.monotonic())
        if stream is None:
            return []
        start = bisect.bisect_right(stream.seqs, offset_key(after)[1])
        return [(f"0-{seq}", event) for seq, event in zip(
            stream.seqs[start:start + count], stream.events[start:start + count], strict=True
        )]

    async def read(self, key: str, after: str, *, block_ms: int = 0, count: int = 1000) -> list[Entry]:
        return (await self.read_many({key: after}, block_ms=block_ms, count=count)).get(key, [])

    async def read_many(self, positions: dict[str, str], *, block_ms: int = 0, count: int = 100) -> dict[str, list[Entry]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_ms / 1000
        while True:
            with self._lock:
                found = {key: entries for key, after in positions.items() if (entries := self._take(key, after, count))}
                if found or loop.time() >= deadline:
                    return found
                waiter = loop.create_future()
                streams = [self._waiting(key) for key in positions]
                for stream in streams:
                    stream.waiters.append((loop, waiter))
            try:
                await asyncio.wait_for(waiter, timeout=max(deadline - loop.time(), 0))
            except TimeoutError:
                pass
            finally:  # a wait that timed out leaves no waiter behind on the quiet logs
                with self._lock:
                    for stream in streams:
                        if (loop, waiter) in stream.waiters:
                            stream.waiters.remove((loop, waiter))

    def _waiting(self, key: str) -> _Stream:
        now = time.monotonic()
        return self._stream(key, now) or self._streams.setdefault(
            key, _Stream(expires_at=now + settings.EVENT_LOG_TTL_SECONDS)
        )

    async def head(self, key: str) -> str:
        with self._lock:
            stream = self._stream(key, time.monotonic())
            return f"0-{stream.seqs[-1]}" if stream and stream.seqs else START


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


# --- services mode: Redis Streams ---------------------------------------------------------


class RedisEventLog:
    """A Redis Stream per key. One client (and connection pool) per event loop: redis.asyncio
    connections belong to the loop that opened them, and every blocked reader holds one
    connection for its XREAD BLOCK, so the pool is sized for the streams a process serves."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
        self._appenders: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Appender] = weakref.WeakKeyDictionary()

    def client(self) -> Any:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = self._clients[loop] = _redis_client(self.url)
        return client

    async def append(self, key: str, event: dict[str, Any]) -> str:
        loop = asyncio.get_running_loop()
        appender = self._appenders.get(loop)
        if appender is None:
            appender = self._appenders[loop] = _Appender(self.client())
        return await appender.append(key, json.dumps(event, separators=(",", ":")))

    async def read(self, key: str, after: str, *, block_ms: int = 0, count: int = 1000) -> list[Entry]:
        return (await self.read_many({key: after}, block_ms=block_ms, count=count)).get(key, [])

    async def read_many(self, positions: dict[str, str], *, block_ms: int = 0, count: int = 100) -> dict[str, list[Entry]]:
        reply = await self.client().xread(positions, count=count, block=block_ms or None)
        if not reply:
            return {}
        # RESP2 answers [[key, entries], …]; RESP3 {key: [entries]}.
        streams = reply.items() if isinstance(reply, dict) else reply
        return {
            key: [(offset, json.loads(fields["e"])) for offset, fields in _entries(found)]
            for key, found in streams
        }

    async def head(self, key: str) -> str:
        last = await self.client().xrevrange(key, count=1)
        return last[0][0] if last else START


def _entries(found: list[Any]) -> list[Any]:
    return found[0] if found and isinstance(found[0], list) else found


class _Appender:
    """Every generation of a process appends through one pipeline: what was appended while the
    last round trip was out goes in the next, so N streams cost one round trip per batch rather
    than N (a generation awaits its own append, so its events keep their order)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.pending: list[tuple[str, str, asyncio.Future[str]]] = []
        self.flushing: asyncio.Task[None] | None = None

    async def append(self, key: str, data: str) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending.append((key, data, future))
        if self.flushing is None or self.flushing.done():
            self.flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for key, data, _ in batch:
                        pipe.xadd(key, {"e": data}, maxlen=settings.EVENT_LOG_MAXLEN, approximate=True)
                    for key in {key for key, _, _ in batch}:  # once per log, after its appends
                        pipe.expire(key, settings.EVENT_LOG_TTL_SECONDS)
                    replies = await pipe.execute()
            except Exception as error:  # every waiting generation learns it
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, _, future), offset in zip(batch, replies[:len(batch)], strict=True):
                if not future.done():
                    future.set_result(offset)


def _redis_client(url: str) -> Any:
    import redis.asyncio as redis

    from config.redis_options import redis_options

    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.EVENT_LOG_MAX_CONNECTIONS,
        timeout=10,  # a full pool makes a reader wait, not fail
        decode_responses=True,
        **redis_options(asynchronous=True),
        # Longer than any XREAD BLOCK, so a blocked read is never cut by the socket timeout.
        socket_timeout=settings.EVENT_LOG_BLOCK_MS / 1000 + 10,
    )
    return redis.Redis(connection_pool=pool)


_log: EventLog | None = None
_log_lock = threading.Lock()


def event_log() -> EventLog:
    """This process's log: Redis in services mode, memory in embedded mode."""
    global _log
    with _log_lock:
        if _log is None:
            _log = RedisEventLog(settings.REDIS_URL) if settings.REDIS_URL else MemoryEventLog()
        return _log


async def read_all(log: EventLog, key: str, after: str = START) -> list[Entry]:
    """Every event after `after` that is in the log now (the sweep and joins build state from it)."""
    entries: list[Entry] = []
    while True:
        page = await log.read(key, after, count=1000)
        if not page:
            return entries
        entries.extend(page)
        after = page[-1][0]
