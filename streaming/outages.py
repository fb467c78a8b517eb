"""Dependencies that come and go: what counts as PostgreSQL or Redis being away, and riding out
an outage of seconds instead of losing an answer.

Each surface maps `UNAVAILABLE` in its one error mapper (503 with Retry-After on REST and /v1,
an `upstream_error` frame on a socket). A generation outlasts an outage: its events wait in an
`EventOutbox` while the log is away, and its final store is retried (`outlast`) for up to
DEPENDENCY_RETRY_SECONDS, so the answer is stored and billed once both are back. What the log
could not take by then is delivered in the background (`deliver_later`), so an outage longer
than the retries holds up neither the generation nor the conversation, and still ends every
socket's turn with its terminal event once Redis answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import deltas, eventlog

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A dependency is away (refused, reset, restarting, timed out): worth a retry, never a 500.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OperationalError, InterfaceError, RedisConnectionError, RedisTimeoutError,
)
UNAVAILABLE_MESSAGE = "a service Parley depends on is briefly unavailable; retry shortly"


def retry_after() -> float:
    """Seconds a client is told to wait before retrying during an outage."""
    return settings.DEPENDENCY_RETRY_AFTER_SECONDS


def _backoff(attempt: int) -> float:
    return min(0.25 * 2**attempt, 4.0)


async def outlast(call: Callable[[], Awaitable[T]], *, what: str, seconds: float | None = None) -> T:
    """`call()`, retried with backoff while a dependency is away, for up to `seconds`
    (DEPENDENCY_RETRY_SECONDS); then the last error is raised."""
    deadline = time.monotonic() + (settings.DEPENDENCY_RETRY_SECONDS if seconds is None else seconds)
    attempt = 0
    while True:
        try:
            return await call()
        except UNAVAILABLE:
            delay = _backoff(attempt)
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("%s: a dependency is away; retrying in %.2fs", what, delay)
            await asyncio.sleep(delay)
            attempt += 1


class EventOutbox:
    """A generation's appends to its log, in order, that never fail the generation: while the
    log is away, events wait here (retried at most once a second, so a dead Redis does not
    slow the stream) and go out, in order, once it answers again. Readers resume from their
    offsets: Redis Stream ids grow with time, so what is appended after a restart follows.

    One send runs at a time, taking everything queued: deltas queued while an append was out
    go as one (deltas.py), so a generation whose log round trips are slow (a busy process)
    keeps up with its upstream and appends fewer, larger deltas instead of falling behind."""

    RETRY_INTERVAL = 1.0

    def __init__(self, key: str) -> None:
        self.key = key
        self.pending: list[dict[str, Any]] = []
        self.retry_at = 0.0
        self._sending: asyncio.Task[BaseException | None] | None = None

    async def append(self, event: dict[str, Any], *, wait: bool = True) -> None:
        """Queue the event and send what waits, unless the log failed less than a second ago;
        with `wait`, until what was queued is in the log (or the log failed). Never raises: a
        failure leaves the events waiting for the next try."""
        self.pending.append(event)
        if time.monotonic() >= self.retry_at:
            sending = self._send_started()
            if wait:
                await asyncio.shield(sending)

    def _send_started(self) -> asyncio.Task[BaseException | None]:
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send(), name=f"event outbox {self.key}")
        return self._sending

    async def _send(self) -> BaseException | None:
        log = eventlog.event_log()
        try:
            while self.pending:
                event, end = deltas.deltas_merge(self.pending)
                await log.append(self.key, event)
                del self.pending[:end]  # only now: a failed append leaves them queued, in order
        except eventlog.LOG_ERRORS as error:
            self.retry_at = time.monotonic() + self.RETRY_INTERVAL
            logger.warning("event log %s unavailable; %d events wait", self.key, len(self.pending))
            return error
        return None

    async def _flush(self) -> None:
        """Send everything queued (after the send in flight); raises the log's error."""
        while self.pending or (self._sending is not None and not self._sending.done()):
            error = await asyncio.shield(self._send_started())
            if error is not None:
                raise error

    async def drain(self, *, seconds: float | None = None) -> bool:
        """Deliver what waits, retrying for up to `seconds` (DEPENDENCY_RETRY_SECONDS). False
        when the log stayed away; the events still wait."""
        if not self.pending and (self._sending is None or self._sending.done()):
            return True
        try:
            await outlast(self._flush, what=f"event log {self.key}", seconds=seconds)
        except eventlog.LOG_ERRORS:
            return False
        return True


# Outboxes of finished generations whose log stayed away, delivering in the background
# (strong references: the event loop keeps only weak ones to its tasks).
_late: set[asyncio.Task[None]] = set()


def deliver_later(outbox: EventOutbox) -> None:
    """Hand what a finished generation could not deliver to a background task that keeps
    trying for EVENT_LOG_DELIVERY_SECONDS: the answer is stored and the conversation free, so
    the generation ends, while a socket reading the log still gets the rest of the answer and
    its terminal event whenever Redis answers again within that time."""
    logger.warning("event log %s: %d events wait for Redis in the background", outbox.key, len(outbox.pending))
    task = asyncio.create_task(_deliver(outbox), name=f"late delivery {outbox.key}")
    _late.add(task)
    task.add_done_callback(_late.discard)


async def _deliver(outbox: EventOutbox) -> None:
    if not await outbox.drain(seconds=settings.EVENT_LOG_DELIVERY_SECONDS):
        logger.error("event log %s: %d events could not be delivered", outbox.key, len(outbox.pending))
