"""The chat engine: plain async Python between the wire surfaces and the services.

A generation belongs to its conversation, not to the socket that asked for it: it runs as a
detached task and appends every event to the conversation's event log (eventlog.py), so any
number of readers in any web process see the same stream from offsets of their own, a slow
reader catches up instead of losing events, and a dropped socket neither stops nor loses it.
Each generation (generation.py: a turn loop over upstream rounds, the output gate and its
control channel) listens on a channel of its own (stored on the conversation) for `cancel`; its
claim on the conversation carries a heartbeat, so when its process dies the
sweep (recovery.py) finishes the bookkeeping from the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from channels.layers import get_channel_layer

from config.db import database_sync_to_async
from observability import metrics
from observability.context import context_bind
from routing.selection import with_grades
from streaming import deltas, eventlog, fanout

from . import gatekeepers, recovery, services, shutdown, turns
from .cached_turns import cache_before_grading
from .control import control_send_cancel
from .gatekeepers import Caller
from .generation import Generation
from .protocol import ConversationState, Event, MessageCreate
from .turns import TurnPlan

logger = logging.getLogger(__name__)

# The generations running in this process, by task (strong references: the event loop keeps
# only weak ones).
_running: dict[asyncio.Task, Generation] = {}


def generations_running() -> set[asyncio.Task]:
    return set(_running)


def generations_interrupt() -> None:
    """Shutdown: stop every running generation here; each stores and bills what streamed."""
    for generation in _running.values():
        generation.interrupt()


shutdown.drainable_register(shutdown.Drainable(running=generations_running, interrupt=generations_interrupt))


async def publish(plan: TurnPlan, event: Event) -> str:
    """Append to the conversation's log; returns the event's offset. Never waits for readers."""
    return await eventlog.event_log().append(eventlog.log_key(plan.group), event.as_dict())


async def events_follow(key: str, after: str) -> AsyncIterator[eventlog.Entry]:
    """Every wire event of the log after `after`, in order, then each as it is appended;
    runs until cancelled. A Redis outage pauses it: it resumes from the same offset. A reader
    that is behind gets each run of deltas it has not sent yet as one (at the run's last
    offset); one that keeps up gets a delta per token."""
    async with contextlib.aclosing(fanout.fanout().pages(key, after)) as pages:
        async for page in pages:
            for entry in deltas.entries_coalesce([e for e in page if e[1].get("type") not in recovery.INTERNAL_EVENTS]):
                yield entry


async def _hop(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """A synchronous database function off the loop (billing.metering's Hop), for grading calls."""
    return await database_sync_to_async(fn)(*args, **kwargs)


@dataclass(frozen=True)
class Submitted:
    plan: TurnPlan
    key: str  # the conversation's event log
    after: str  # the log's offset before this turn's first event


async def turn_submit(*, caller: Caller, command: MessageCreate) -> Submitted:
    """Commit the user's message, start the generation; its events follow `after` in the log.

    Raises the services' domain errors before anything is published."""
    shutdown.turn_admit()
    layer = get_channel_layer()
    # The log's position before this turn, read before the claim so that nothing can fail
    # between claiming and starting; a new conversation's log is empty. At most the previous
    # turn's last event (written just after it freed the conversation) comes after it.
    after = eventlog.START
    if command.conversation_id is not None:
        await recovery.conversation_recover(caller=caller, conversation_id=command.conversation_id)
        after = await eventlog.event_log().head(eventlog.log_key(
            services.group_name(tenant_id=caller.tenant_id, conversation_id=command.conversation_id)
        ))
    # Default prefix: channels_redis reads all of a process's specific channels through one
    # receive loop keyed on it; a custom prefix would starve the sockets' channels.
    control = await layer.new_channel()
    prepare = functools.partial(
        database_sync_to_async(turns.turn_prepare),
        caller=caller,
        content=command.content,
        conversation_id=command.conversation_id,
        assistant_slug=command.assistant,
        client_msg_id=command.client_msg_id,
        control_channel=control,
    )
    prepare = cache_before_grading(prepare, caller=caller, question=command.content)
    plan = await with_grades(prepare, hop=_hop)  # a classifier route grades between two tries
    context_bind(tenant_id=caller.tenant_id, conversation_id=plan.conversation_id, message_id=plan.assistant_message_id)
    generation = Generation(plan=plan, control_channel=control)
    task = asyncio.create_task(generation.run(), name=f"generation {plan.assistant_message_id}")
    _running[task] = generation
    started = metrics.generation_started("chat")
    task.add_done_callback(lambda _: metrics.generation_ended("chat", started))
    task.add_done_callback(lambda done: _running.pop(done, None))
    beat = asyncio.create_task(recovery.heartbeat(plan), name=f"heartbeat {plan.assistant_message_id}")
    task.add_done_callback(lambda _: beat.cancel())
    return Submitted(plan=plan, key=eventlog.log_key(plan.group), after=after)


async def generation_cancel(*, caller: Caller, conversation_id: uuid.UUID) -> bool:
    """Ask the conversation's running generation (in whichever process) to stop.
    Raises NotFound for a foreign or missing conversation; False when nothing is running."""
    _, control = await database_sync_to_async(services.conversation_generation)(
        caller=caller, conversation_id=conversation_id
    )
    if control is None:
        return False
    await control_send_cancel(control)
    return True


@dataclass(frozen=True)
class Joined:
    key: str  # the conversation's event log
    state: ConversationState  # the log up to `offset`
    offset: str
    after: str  # where the joiner's reading starts: `offset`, or the client's own offset


async def conversation_join(*, caller: Caller, conversation_id: uuid.UUID, after: str | None) -> Joined:
    """The conversation's state, built from its log, and where to read on. Without `after`
    the state carries the running answer so far and reading starts right after it; with
    `after` (the last offset the client saw) every event after it is read again, exactly
    once, and the state carries no content. Raises NotFound."""
    conversation = await database_sync_to_async(gatekeepers.access_conversation)(
        caller=caller, conversation_id=conversation_id
    )
    await recovery.conversation_recover(caller=caller, conversation_id=conversation.id)
    key = eventlog.log_key(services.group_name(tenant_id=caller.tenant_id, conversation_id=conversation.id))
    entries = await eventlog.read_all(eventlog.event_log(), key)
    offset = entries[-1][0] if entries else eventlog.START
    state = recovery.state_from_log(conversation.id, [event for _, event in entries], with_content=after is None)
    return Joined(key=key, state=state, offset=offset, after=offset if after is None else after)
