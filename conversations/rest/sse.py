"""One REST turn over the event log: submit it, then read its events from the conversation's log.

The REST surface reads exactly like a socket does, from the offset the log was at before the
turn's first event. The generation is detached, so a client that goes away mid-stream stops
only the forwarding.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.http import StreamingHttpResponse

from config.db import database_sync_to_async
from conversations import engine, services
from conversations.gatekeepers import Caller
from conversations.protocol import ErrorEvent, MessageCreate
from conversations.turns import TurnPlan
from streaming import outages

logger = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset({"message.completed", "error"})
LOG_LOST_MESSAGE = "the event log lost the end of this reply (it restarted); the stored message has the answer"
KEEPALIVE_SECONDS = 15.0
DONE = b"data: [DONE]\n\n"


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class TurnListener:
    """The events of one submitted turn, read from the log by a reader task into a local
    queue, so the HTTP side can wait with a keep-alive timeout without ending the reading."""

    turn: engine.Submitted
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    log_lost: bool = False  # the log lost the terminal event (Redis restarted empty)
    _reader: asyncio.Task[None] | None = None

    @property
    def plan(self) -> TurnPlan:
        return self.turn.plan

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name=f"rest listener {self.turn.key}")

    def _ours(self, event: dict[str, Any]) -> bool:
        # The log is the conversation's: skip the previous turn's last event, written just
        # after it freed the conversation (events without a message_id are this turn's).
        owner = event.get("message_id")
        return owner is None or owner in (str(self.plan.user_message_id), str(self.plan.assistant_message_id))

    async def _read(self) -> None:
        async for offset, event in engine.events_follow(self.turn.key, self.turn.after):
            if not self._ours(event):
                continue
            await self.queue.put({**event, "offset": offset})
            if event.get("type") in TERMINAL_EVENTS:
                return

    async def events(self, *, keepalive: float | None = None) -> AsyncIterator[dict[str, Any] | None]:
        """The turn's events up to and including the terminal one; None every `keepalive`
        seconds without an event (a heartbeat for proxies). When the log makes no progress for
        EVENT_LOG_STALL_SECONDS and the generation is no longer running, the terminal event
        is lost (Redis restarted empty): an `upstream_error` ends the turn instead."""
        stall = settings.EVENT_LOG_STALL_SECONDS
        progress = time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=min(keepalive or stall, stall))
            except TimeoutError:
                if time.monotonic() - progress >= stall and not await self._generation_running():
                    self.log_lost = True
                    yield ErrorEvent(
                        code="upstream_error", message=LOG_LOST_MESSAGE, message_id=str(self.plan.assistant_message_id)
                    ).as_dict()
                    return
                yield None
                continue
            progress = time.monotonic()
            yield event
            if event.get("type") in TERMINAL_EVENTS:
                return

    async def _generation_running(self) -> bool:
        """Whether this turn's generation still holds the conversation (in any process).
        While the database is away that is unknown: keep waiting."""
        try:
            return await database_sync_to_async(services.generation_running)(
                conversation_id=self.plan.conversation_id, generation_id=self.plan.assistant_message_id
            )
        except outages.UNAVAILABLE:
            return True

    async def close(self) -> None:
        """Stop forwarding (the generation goes on). Safe to call more than once."""
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            await asyncio.wait([self._reader])


async def turn_listen(*, caller: Caller, command: MessageCreate) -> TurnListener:
    """Submit the turn and start reading its events. Raises the engine's domain errors
    (NotFound, InvalidInput, GenerationBusy, PriceMissing, …) before anything streams."""
    return await asyncio.create_task(_turn_listen(caller=caller, command=command), context=contextvars.Context())


async def _turn_listen(*, caller: Caller, command: MessageCreate) -> TurnListener:
    # Runs in a fresh context (see turn_listen's caller): the generation task started here
    # copies it, and must not inherit a request's ThreadSensitiveContext or an async_to_sync
    # caller's thread — both are gone when the request ends, and the generation's database
    # calls would then fail ("CurrentThreadExecutor already quit").
    listener = TurnListener(turn=await engine.turn_submit(caller=caller, command=command))
    listener.start()
    return listener


async def turn_wait(*, caller: Caller, command: MessageCreate) -> tuple[TurnPlan, dict[str, Any]]:
    """Submit the turn and wait for its terminal event (message.completed or error)."""
    listener = await turn_listen(caller=caller, command=command)
    terminal: dict[str, Any] = {}
    try:
        async for event in listener.events():
            if event is not None:
                terminal = event
    finally:
        await listener.close()
    return listener.plan, {**terminal, "log_lost": True} if listener.log_lost else terminal


async def event_stream(listener: TurnListener) -> AsyncIterator[bytes]:
    """The `text/event-stream` body: each WebSocket event as a `data:` line, then [DONE]."""
    try:
        async for event in listener.events(keepalive=KEEPALIVE_SECONDS):
            yield b": keepalive\n\n" if event is None else sse_data(event)
        yield DONE
    finally:
        # Also reached when the client disconnects and the server cancels this iterator.
        await asyncio.shield(listener.close())


def event_stream_response(listener: TurnListener) -> StreamingHttpResponse:
    # An async iterator: under ASGI, Django streams it on the event loop, not in a thread.
    response = StreamingHttpResponse(event_stream(listener), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response
