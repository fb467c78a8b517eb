"""A generation's control channel: cancel from any process, interrupt at shutdown, the time budget.

Control messages ride the channel layer, to the generation's own channel: they are few, and a
lost one is a cancel the user repeats. Events never do: they go to the event log. A stop
interrupts only a wait (for the model, for tools), never a publish halfway, so what is stored
is exactly what the sockets were sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from channels.layers import get_channel_layer

logger = logging.getLogger(__name__)

CONTROL_CANCEL = "generation.cancel"
CONTROL_STOP = "generation.stop"

CANCELLED = "cancelled"
INTERRUPTED = "interrupted"  # the process shut down: stored as a dead process's answer is
TIME_BUDGET_EXHAUSTED = "time_budget_exhausted"  # past GENERATION_MAX_SECONDS


class Control:
    """Why and when a generation's work must stop; `run` the work that a stop may interrupt."""

    def __init__(self, channel: str, *, name: str) -> None:
        self.channel = channel
        self.name = name  # for logs
        self.stopped = False  # asked to stop now: by a cancel, a shutdown or the time budget
        self.reason = ""
        self._task: asyncio.Task | None = None
        self._interruptible = False

    async def run(self, work: Coroutine[Any, Any, None]) -> None:
        """Run the work a stop may interrupt; returns quietly when a stop did."""
        if self.stopped:
            work.close()
            return
        self._task = asyncio.create_task(work)
        try:
            await self._task
        except asyncio.CancelledError:
            if not self.stopped:
                raise

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A wait a stop may cut short (the work's task is cancelled while inside it)."""
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def cancel(self) -> None:
        self.stop(CANCELLED)

    def interrupt(self) -> None:
        """The process shuts down: end `incomplete` with what streamed, as a dead one is stored."""
        self.stop(INTERRUPTED)

    def out_of_time(self) -> None:
        logger.warning("generation %s ran out of its time budget", self.name)
        self.stop(TIME_BUDGET_EXHAUSTED)

    def stop(self, reason: str) -> None:
        if self.stopped or (self._task is not None and self._task.done()):
            return
        self.stopped, self.reason = True, reason
        # Before the work starts, it will not run; waiting on the model or on tools, stop
        # now; otherwise at the work's next check.
        if self._task is not None and self._interruptible:
            self._task.cancel()

    async def listen(self) -> None:
        """Until told to stop listening: apply the channel's messages."""
        layer = get_channel_layer()
        while True:
            message = await layer.receive(self.channel)  # waits out a Redis restart
            kind = message.get("type")
            if kind == CONTROL_STOP:
                return
            if kind == CONTROL_CANCEL:
                self.cancel()

    async def close(self, listener: asyncio.Task) -> None:
        # Never cancel a channels_redis receive: it pops from a list shared by every channel
        # of this process, and a receive cancelled mid-pop drops a socket's message. Ask the
        # listener to return instead.
        try:
            await get_channel_layer().send(self.channel, {"type": CONTROL_STOP})
            await asyncio.wait_for(asyncio.shield(listener), timeout=10)
        except Exception:
            logger.warning("generation %s: control listener did not stop cleanly", self.name)
            listener.cancel()


async def control_send_cancel(channel: str) -> None:
    await get_channel_layer().send(channel, {"type": CONTROL_CANCEL})
