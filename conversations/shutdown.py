"""Graceful shutdown of a web process (SIGTERM; config/daphne.py wires the signal).

Draining, the process refuses new turns on every surface (`ShuttingDown`: a socket error
event, a REST or `/v1` 503 with Retry-After) — the client retries, and the load balancer
sends it to another process. Running generations and `/v1` calls get SHUTDOWN_GRACE_SECONDS
to finish. What still runs then is interrupted the way a cancel interrupts it: a generation
stores what streamed as `incomplete` (finish reason `interrupted`, as the dead-generation sweep
stores it), bills it, releases its hold, frees the conversation and ends its log with
`message.completed`; a `/v1` stream is billed for what streamed, its hold returned, and ends
with OpenAI's in-stream error. Then this process's cap leases are given back and it exits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from .errors import ShuttingDown

logger = logging.getLogger(__name__)

# Time the interrupted work gets to store and bill itself (database writes, not generation).
CHECKPOINT_SECONDS = 10.0

_draining = False


def draining() -> bool:
    return _draining


def turn_admit() -> None:
    """Raises ShuttingDown once the process drains: a new turn would not finish here."""
    if _draining:
        raise ShuttingDown(retry_after=settings.SHUTDOWN_RETRY_AFTER_SECONDS)


@dataclass(frozen=True)
class Drainable:
    """Work of one kind a process runs (generations, `/v1` calls): what is running, how to
    interrupt it, and what to await once it stopped (bookkeeping it left in flight)."""

    running: Callable[[], set[asyncio.Task[Any]]]
    interrupt: Callable[[], None]
    settled: Callable[[], Awaitable[None]] | None = None


# Users register here (this module imports none of them): a module never imported has no work.
_drainables: list[Drainable] = []
_finally: list[Callable[[], Awaitable[Any]]] = []


def drainable_register(drainable: Drainable) -> None:
    _drainables.append(drainable)


def drained_register(callback: Callable[[], Awaitable[Any]]) -> None:
    """Run after every drainable settled (e.g. giving back this process's cap leases)."""
    _finally.append(callback)


async def drain(*, grace: float) -> None:
    """Refuse new turns, let running work finish for `grace` seconds, interrupt the rest and
    wait for it to be stored and billed, then run what registered for the end (cap leases)."""
    global _draining
    _draining = True
    running: set[asyncio.Task[Any]] = set().union(*(d.running() for d in _drainables))
    logger.warning("shutting down: %d generations and /v1 calls get %.0f s to finish", len(running), grace)
    if running:
        _, pending = await asyncio.wait(running, timeout=grace)
        if pending:
            logger.warning("shutting down: interrupting %d still running", len(pending))
            for drainable in _drainables:
                drainable.interrupt()
            await asyncio.wait(pending, timeout=CHECKPOINT_SECONDS)
    for drainable in _drainables:
        if drainable.settled is not None:
            await drainable.settled()
    for callback in _finally:
        await callback()
