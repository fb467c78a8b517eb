"""One REST turn over the channel layer: submit it, then read its events as they are published.

The REST surface listens exactly like a socket does: it creates a channel of its own, hands it
to `engine.turn_submit` as the subscriber, and reads the conversation's group events from it.
The generation is detached, so a client that goes away mid-stream stops only the forwarding.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from channels.layers import get_channel_layer

from . import engine
from .protocol import MessageCreate
from .services import Caller, TurnPlan

logger = logging.getLogger(__name__)

TERMINAL_EVENTS = frozenset({"message.completed", "error"})
# Our own message to the reading task: the HTTP client left, stop reading.
READER_STOP = "rest.stop"
KEEPALIVE_SECONDS = 15.0
DONE = b"data: [DONE]\n\n"


def sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class TurnListener:
    """The events of one submitted turn, read from our own channel by a reader task.

    Never cancel a pending channels_redis `receive()`: it pops from a list shared by every
    channel of the process, and a receive cancelled mid-pop drops another consumer's message.
    So the receive runs in a task of its own that ends only after a terminal event or our stop
    message, and the HTTP side waits on a local queue, which is safe to cancel."""

    plan: TurnPlan
    channel: str
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)
    _reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name=f"rest listener {self.channel}")

    async def _read(self) -> None:
        layer = get_channel_layer()
        try:
            while True:
                message = await layer.receive(self.channel)
                if message.get("type") == READER_STOP:
                    return
                if message.get("type") != engine.GROUP_EVENT:
                    continue
                event = message["event"]
                await self.queue.put(event)
                if event.get("type") in TERMINAL_EVENTS:
                    return
        finally:
            await self.queue.put(None)

    async def events(self, *, keepalive: float | None = None) -> AsyncIterator[dict[str, Any] | None]:
        """The turn's events up to and including the terminal one; None every `keepalive`
        seconds without an event (a heartbeat for proxies)."""
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=keepalive)
            except TimeoutError:
                yield None
                continue
            if event is None:
                return
            yield event
            if event.get("type") in TERMINAL_EVENTS:
                return

    async def close(self) -> None:
        """Stop forwarding (the generation goes on). Safe to call more than once."""
        layer = get_channel_layer()
        await layer.group_discard(self.plan.group, self.channel)
        if self._reader is not None and not self._reader.done():
            await layer.send(self.channel, {"type": READER_STOP})
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), timeout=10)
            except Exception:  # noqa: BLE001 — a stuck reader must not fail the response
                logger.warning("REST listener %s did not stop cleanly", self.channel)


async def turn_listen(*, caller: Caller, command: MessageCreate) -> TurnListener:
    """Submit the turn with a fresh channel subscribed to it. Raises the engine's domain
    errors (NotFound, InvalidInput, GenerationBusy, PriceMissing, …) before anything streams."""
    return await asyncio.create_task(_turn_listen(caller=caller, command=command), context=contextvars.Context())


async def _turn_listen(*, caller: Caller, command: MessageCreate) -> TurnListener:
    # Runs in a fresh context (see turn_listen's caller): the generation task started here
    # copies it, and must not inherit a request's ThreadSensitiveContext or an async_to_sync
    # caller's thread — both are gone when the request ends, and the generation's database
    # calls would then fail ("CurrentThreadExecutor already quit").
    channel = await get_channel_layer().new_channel()
    plan = await engine.turn_submit(caller=caller, command=command, subscriber=channel)
    listener = TurnListener(plan=plan, channel=channel)
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
    return listener.plan, terminal


async def event_stream(listener: TurnListener) -> AsyncIterator[bytes]:
    """The `text/event-stream` body: each WebSocket event as a `data:` line, then [DONE]."""
    try:
        async for event in listener.events(keepalive=KEEPALIVE_SECONDS):
            yield b": keepalive\n\n" if event is None else sse_data(event)
        yield DONE
    finally:
        # Also reached when the client disconnects and the server cancels this iterator.
        await asyncio.shield(listener.close())
