"""Generations whose process died: a heartbeat on the claim, and the sweep that finishes their
bookkeeping from the event log (the log is the checkpoint).

A running generation refreshes its claim's heartbeat every GENERATION_HEARTBEAT_SECONDS. A
claim whose heartbeat is older than GENERATION_STALE_SECONDS (SIGKILL, OOM, a deploy) is
swept: by beat, and before a join or a turn on that conversation. The sweep stores what
streamed of the last round as an `incomplete` answer (finish reason `interrupted`), bills it
(tiktoken counts: the provider's usage never arrived), settles every hold of the generation,
frees the conversation, and appends a terminal error to the log so joined sockets learn it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.caps import Subject
from billing.metering import call_rehold, calls_release
from billing.models import UsageRecord
from billing.services import price_for
from config.db import database_sync_to_async
from streaming import eventlog

from . import answers, services, turns
from .control import INTERRUPTED
from .models import Conversation, Message
from .protocol import ConversationState, ErrorEvent

logger = logging.getLogger(__name__)

# Written to the log for the sweep, never sent to clients.
ROUND_RECORD = "generation.round"
INTERNAL_EVENTS = frozenset({ROUND_RECORD})
TERMINAL_EVENTS = frozenset({"message.completed", "error"})


async def round_record(plan: turns.TurnPlan, *, round_number: int, prompt_tokens: int) -> None:
    """Note in the log what billing a round needs should this process die during it."""
    await eventlog.event_log().append(eventlog.log_key(plan.group), {
        "type": ROUND_RECORD, "message_id": str(plan.assistant_message_id), "round": round_number,
        "prompt_tokens": prompt_tokens, "model": plan.model, "api_key_id": plan.caller.api_key_id,
    })


# The running generations of each event loop, beaten together by one task.
_beating: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[uuid.UUID]] = weakref.WeakKeyDictionary()


async def heartbeat(plan: turns.TurnPlan) -> None:
    """Runs beside a generation until it ends (its task cancels this one). Every generation of
    the process beats in the same UPDATE: one query (and one database connection) per period,
    not one per generation."""
    loop = asyncio.get_running_loop()
    beating = _beating.setdefault(loop, set())
    if not beating:
        loop.create_task(_beat(beating), name="generation heartbeats")
    beating.add(plan.assistant_message_id)
    try:
        await loop.create_future()  # until the generation ends
    finally:
        beating.discard(plan.assistant_message_id)


async def _beat(beating: set[uuid.UUID]) -> None:
    while beating:
        await asyncio.sleep(settings.GENERATION_HEARTBEAT_SECONDS)
        try:
            await database_sync_to_async(services.generations_beat)(generation_ids=list(beating))
        except Exception:  # a missed beat is retried; only a minute of them is a death
            logger.warning("heartbeat of %d generations failed", len(beating), exc_info=True)


def state_from_log(conversation_id: uuid.UUID, events: list[dict[str, Any]], *, with_content: bool) -> ConversationState:
    """The conversation as the log tells it: a generation runs from its `message.started`
    until its terminal event; its content is every delta it published."""
    current: str | None = None
    parts: list[str] = []
    for event in events:
        kind = event.get("type")
        if kind == "message.started":
            current, parts = event["message_id"], []
        elif current is not None and event.get("message_id") == current:
            if kind == "delta":
                parts.append(event["content"])
            elif kind in TERMINAL_EVENTS:
                current = None
    if current is None:
        return ConversationState(conversation_id=str(conversation_id), generating=False)
    return ConversationState(
        conversation_id=str(conversation_id), generating=True, message_id=current,
        content="".join(parts) if with_content else None,
    )


@dataclass(frozen=True)
class Partial:
    """What a dead generation's last round streamed, and what billing it needs."""

    content: str = ""
    round_number: int = 0
    prompt_tokens: int | None = None
    model: str = ""
    api_key_id: int | None = None


def partial_from_log(generation_id: str, events: list[dict[str, Any]]) -> Partial:
    partial, parts = Partial(), []
    for event in events:
        if event.get("message_id") != generation_id:
            continue
        kind = event.get("type")
        if kind == ROUND_RECORD:
            partial = Partial(
                round_number=event["round"], prompt_tokens=event["prompt_tokens"], model=event["model"],
                api_key_id=event.get("api_key_id"),
            )
            parts = []
        elif kind == "tool.call":
            parts = []  # text before a tool call is stored with its tool round
        elif kind == "delta":
            parts.append(event["content"])
    return Partial(**{**partial.__dict__, "content": "".join(parts)})


# --- the sweep ----------------------------------------------------------------------------


async def conversation_recover(*, caller: services.Caller, conversation_id: uuid.UUID) -> None:
    """Before a join or a turn: finish the conversation's generation if its process died."""
    for tenant_id, _, generation_id in await database_sync_to_async(services.stale_generations)(
        conversation_id=conversation_id
    ):
        if tenant_id == caller.tenant_id:
            await generation_recover(tenant_id=tenant_id, conversation_id=conversation_id, generation_id=generation_id)


async def generations_recover() -> int:
    """Beat: finish every generation whose process died. Returns how many were stored."""
    count = 0
    for tenant_id, conversation_id, generation_id in await database_sync_to_async(services.stale_generations)():
        try:
            count += await generation_recover(
                tenant_id=tenant_id, conversation_id=conversation_id, generation_id=generation_id
            )
        except Exception:
            logger.exception("could not recover generation %s", generation_id)
    return count


async def generation_recover(*, tenant_id: int, conversation_id: uuid.UUID, generation_id: uuid.UUID) -> bool:
    log = eventlog.event_log()
    key = eventlog.log_key(services.group_name(tenant_id=tenant_id, conversation_id=conversation_id))
    events = [event for _, event in await eventlog.read_all(log, key)]
    partial = partial_from_log(str(generation_id), events)
    stored = await database_sync_to_async(generation_checkpoint)(
        conversation_id=conversation_id, generation_id=generation_id, partial=partial
    )
    if stored:
        logger.warning("generation %s died: stored %d characters as incomplete", generation_id, len(partial.content))
        await log.append(key, ErrorEvent(
            code="upstream_error", message="the reply was interrupted; what streamed is kept",
            message_id=str(generation_id),
        ).as_dict())
    return stored


def generation_checkpoint(*, conversation_id: uuid.UUID, generation_id: uuid.UUID, partial: Partial) -> bool:
    """Store and bill a dead generation's partial answer and free its conversation, once:
    under the conversation's row lock, only while the claim is still that stale one."""
    now = timezone.now()
    with transaction.atomic():
        conversation = (
            Conversation.objects.select_for_update(of=("self",)).select_related("assistant")
            .filter(services.stale_claim(now), pk=conversation_id, generation_id=generation_id)
            .first()
        )
        if conversation is None:
            return False  # it is alive after all, or another sweeper got there first
        model = partial.model or conversation.assistant.model
        caller = services.Caller(conversation.tenant_id, conversation.end_user_id, partial.api_key_id)
        owner = turns.CallOwner(
            caller=caller, conversation_id=conversation_id, assistant_message_id=generation_id, model=model,
            price=price_for(model, tenant_id=conversation.tenant_id), prompt_tokens=partial.prompt_tokens or 0,
        )
        started = conversation.generation_started_at or now
        answers.answer_store(plan=owner, outcome=answers.TurnOutcome(
            # Tokens the provider streamed were charged; a round that streamed nothing is
            # settled at zero, as the stale-reservation sweep would.
            called_upstream=bool(partial.content), content=partial.content, status=Message.Status.INCOMPLETE,
            finish_reason=INTERRUPTED, usage=None, streamed=bool(partial.content),
            latency_ms=int((now - started).total_seconds() * 1000), ttft_ms=None,
            usage_outcome=UsageRecord.Outcome.ERROR, round_number=partial.round_number,
            hold=call_rehold(
                call_id=turns.upstream_call_id(generation_id, partial.round_number), model=model, price=owner.price,
                subject=Subject(caller.tenant_id, caller.end_user_id, caller.api_key_id),
                prompt_tokens=owner.prompt_tokens,
            ),
            seq=conversation.last_seq + 1, prompt_estimate=partial.prompt_tokens,
        ))
        # A next round reserved just before the process died never made its call.
        calls_release(call_id_prefix=f"msg-{generation_id}")
    return True
