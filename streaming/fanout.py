"""The fan-out: one read of the event log per event loop for every reader of the process.

Every socket, SSE stream and REST wait follows a conversation's log from an offset of its own.
Rather than each one holding a connection in an XREAD BLOCK of its own (one round trip per
reader per wake-up), a dispatcher per event loop holds the set of logs being followed with the
offset it has read each one to, reads all of them with one XREAD BLOCK, and pushes what it
read into each follower's buffer. Pushing never waits: a slow follower's buffer fills, and past
its bound the follower drops it and reads the gap from the log itself, from its own offset —
it falls behind and catches up, it never loses an event, and it never holds up the others.

XREAD BLOCK cannot be interrupted (cancelling it would cost the connection: redis-py
disconnects a connection whose read was cancelled), so a log first followed while the
dispatcher is blocked joins at the next read: the block is short (EVENT_LOG_BLOCK_MS). A new
follower reads what is already in the log itself, so only events appended after it arrived
wait for that read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator

from django.conf import settings

from observability import metrics

from .eventlog import LOG_ERRORS, Entry, EventLog, event_log, offset_key

logger = logging.getLogger(__name__)


class Follower:
    """One reader of one log. `after` is the last offset it was given; the dispatcher pushes
    what it reads past its own position; `gap_until` (inclusive) is what the follower must read
    from the log itself before its buffer: what preceded its arrival, or what overflowed."""

    def __init__(self, key: str, after: str, *, gap_until: str | None) -> None:
        self.key, self.after, self.gap_until = key, after, gap_until
        self.buffer: deque[Entry] = deque()
        self.ready = asyncio.Event()

    def push(self, entries: list[Entry]) -> None:
        for entry in entries:
            if len(self.buffer) >= settings.EVENT_FANOUT_BUFFER:
                # Too far behind: drop the buffer; this entry and all before it are in the log.
                self.buffer.clear()
                self.gap_until = entry[0]
            else:
                self.buffer.append(entry)
        self.ready.set()

    async def page(self, log: EventLog) -> list[Entry]:
        """The next events after `after`, in order; waits for the dispatcher when there are none."""
        while True:
            if self.gap_until is not None and offset_key(self.after) < offset_key(until := self.gap_until):
                entries = [e for e in await log.read(self.key, self.after) if offset_key(e[0]) <= offset_key(until)]
                if entries:
                    return self._given(entries)
            self.gap_until = None  # read up to it (or it was trimmed away)
            entries = [e for e in self.buffer if offset_key(e[0]) > offset_key(self.after)]
            self.buffer.clear()
            if entries:
                return self._given(entries)
            self.ready.clear()
            await self.ready.wait()

    def _given(self, entries: list[Entry]) -> list[Entry]:
        self.after = entries[-1][0]
        return entries


class Fanout:
    """The dispatcher of one event loop: the logs followed here, each with the offset it has
    been read to and its followers; one task reading them all while any is followed."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.positions: dict[str, str] = {}
        self.followers: dict[str, set[Follower]] = {}
        self._task: asyncio.Task[None] | None = None

    async def follow(self, key: str, after: str) -> AsyncIterator[Entry]:
        """Every entry of the log after `after`, in order, then each as it is appended; runs
        until cancelled. A Redis outage pauses it: it resumes from its offset."""
        async with contextlib.aclosing(self.pages(key, after)) as pages:
            async for page in pages:
                for entry in page:
                    yield entry

    async def pages(self, key: str, after: str) -> AsyncIterator[list[Entry]]:
        """`follow`, a page at a time: each page is every entry that arrived since the reader
        took the last one (one entry for a reader that keeps up, many for one behind)."""
        follower = self._join(key, after)
        try:
            while True:
                try:
                    entries = await follower.page(self.log)
                except LOG_ERRORS:
                    logger.warning("event log %s unreadable; retrying", key, exc_info=True)
                    await asyncio.sleep(1)
                    continue
                yield entries
        finally:
            self._leave(follower)

    def _join(self, key: str, after: str) -> Follower:
        position = self.positions.setdefault(key, after)
        behind = offset_key(after) < offset_key(position)
        follower = Follower(key, after, gap_until=position if behind else None)
        self.followers.setdefault(key, set()).add(follower)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._dispatch(), name="event log fan-out")
        return follower

    def _leave(self, follower: Follower) -> None:
        followers = self.followers.get(follower.key, set())
        followers.discard(follower)
        if not followers:
            self.followers.pop(follower.key, None)
            self.positions.pop(follower.key, None)

    async def _dispatch(self) -> None:
        while self.followers:
            positions = dict(self.positions)
            try:
                found = await self.log.read_many(
                    positions, block_ms=settings.EVENT_LOG_BLOCK_MS, count=settings.EVENT_FANOUT_COUNT
                )
            except Exception:  # a Redis outage, or a bug: followers wait, reading resumes
                logger.warning("event log fan-out failed; retrying", exc_info=True)
                await asyncio.sleep(1)
                continue
            self._hand_out(positions, found)
        self._task = None  # a finished task would keep its loop (this dispatcher's key) alive

    def _hand_out(self, positions: dict[str, str], found: dict[str, list[Entry]]) -> None:
        for key, entries in found.items():
            # A log left and followed again during the read starts over at its new position.
            if not entries or self.positions.get(key) != positions[key]:
                continue
            self.positions[key] = entries[-1][0]
            for follower in self.followers[key]:
                follower.push(entries)
        # The reader furthest behind: entries handed out that it has not taken yet.
        metrics.event_log_lag(max((len(f.buffer) for fs in self.followers.values() for f in fs), default=0))


_fanouts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Fanout] = weakref.WeakKeyDictionary()


def fanout() -> Fanout:
    """The running event loop's dispatcher over this process's log."""
    loop = asyncio.get_running_loop()
    found = _fanouts.get(loop)
    if found is None:
        found = _fanouts[loop] = Fanout(event_log())
    return found
