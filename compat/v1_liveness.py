"""This web process's liveness for `/v1`: its id (on every hold it makes), and its beat.

The first `/v1` call that holds against a cap registers the process (one INSERT, once); from
then on one task per process beats every GENERATION_HEARTBEAT_SECONDS, writing the checkpoint
of every call in flight in one UPDATE (billing/processes.py) — nothing is written per chunk.
The completion tokens of a checkpoint are the provider's usage when it arrived, otherwise
tiktoken's count of what was relayed, counted on the database thread, incrementally.

Should a beat find the process's row gone — the sweep took it for dead after a stall longer
than GENERATION_STALE_SECONDS — the sweep has billed the last checkpoint of its calls and
settled or released everything it held: the process books none of it again. Those calls end at
their next chunk (OpenAI's in-stream error), its leases are closed (releasing is idempotent)
and the next call registers the process afresh. A call admitted after the sweep under the old
id books as usual (`completion_settle`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from django.conf import settings

from billing.metering import holds_release_all
from billing.processes import process_beat, process_forget, process_register

logger = logging.getLogger(__name__)

Hop = Callable[..., Awaitable[Any]]

_process_id: uuid.UUID | None = None
_registering: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
_beating: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[Any]] = weakref.WeakKeyDictionary()
_exit_hook = False
# The endpoint hands us its calls in flight and its database hop (it imports this module).
_calls: Callable[[], list[Any]] = list
_hop: Hop | None = None


def endpoint_register(*, calls: Callable[[], list[Any]], hop: Hop) -> None:
    global _calls, _hop
    _calls, _hop = calls, hop


async def process_id(hop: Hop) -> uuid.UUID:
    """This process's id, registering it on first use; makes sure it beats."""
    global _process_id, _exit_hook
    loop = asyncio.get_running_loop()
    found = _process_id
    if found is None:
        async with _registering.setdefault(loop, asyncio.Lock()):
            if _process_id is None:
                _process_id = await hop(process_register)
                if not _exit_hook:
                    _exit_hook = True
                    atexit.register(_forget_at_exit)
            found = _process_id
    task = _beating.get(loop)
    if task is None or task.done():
        _beating[loop] = loop.create_task(_beat(hop), name="/v1 liveness")
    assert found is not None
    return found


def liveness_forget() -> None:
    """Forget the id without touching the database (tests: the database was flushed)."""
    global _process_id
    _process_id = None


async def _beat(hop: Hop) -> None:
    checkpointed: list[Any] = []  # the calls of the last beat that was written: the sweep billed those
    while True:
        await asyncio.sleep(settings.GENERATION_HEARTBEAT_SECONDS)
        beating = _process_id
        if beating is None:
            continue
        db_after = _hop or hop
        calls = [call for call in _calls() if call.plan.hold.process_id in (beating, None)]
        try:
            alive = await db_after(_beat_write, process_id=beating, calls=calls)
        except Exception:  # a missed beat is retried; only GENERATION_STALE_SECONDS of them is a death
            logger.warning("/v1 liveness beat failed", exc_info=True)
            continue
        if alive:
            checkpointed = calls
        elif _process_id == beating:
            await _swept(checkpointed, db_after)
            checkpointed = []


def _beat_write(*, process_id: uuid.UUID, calls: list[Any]) -> bool:
    return process_beat(process_id=process_id, calls=[call.checkpoint() for call in calls])


async def _swept(checkpointed: list[Any], hop: Hop) -> None:
    global _process_id
    logger.error("this process was taken for dead (no beat for %ss): its /v1 calls were billed from their "
                 "checkpoints and its holds released; ending them and registering again",
                 settings.GENERATION_STALE_SECONDS)
    _process_id = None
    for call in checkpointed:  # billed up to their checkpoints: they end now (a call admitted since books as usual)
        call.cut("this server stalled and its call was settled; send the request again")
    # Its leases admit nothing more; given back (a no-op for those the sweep released).
    await holds_release_all(hop=hop)


def _forget_at_exit() -> None:
    if _process_id is not None:
        with contextlib.suppress(Exception):  # exiting: the sweep deletes it otherwise
            process_forget(process_id=_process_id)
