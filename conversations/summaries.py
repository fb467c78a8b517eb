"""Rolling conversation summaries: compact the oldest history from a high-water mark down to a
low-water mark, incrementally (the previous summary is part of the input).

Safe to run from any worker at any time: a conditional-update claim (which expires, so a killed
worker cannot wedge it) admits one run per conversation, and the new summary is written in one
conditional UPDATE together with the sequence number it covers, so a run killed halfway leaves
the previous summary in force and nothing half-written. Each summary call reserves against the
tenant's caps and is a UsageRecord of kind `summary`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from billing.caps import Subject
from billing.metering import CallFacts, Hold, call_book, call_hold
from billing.models import UsageRecord
from billing.services import Price, price_for
from llm.gateway import ChatRequest, ProviderTarget, Usage
from llm.tokens import count_messages, count_text

from .context import REPLAYED_STATUSES
from .models import Assistant, Conversation, Message
from .providers import provider_target
from .upstream import upstream_text

logger = logging.getLogger(__name__)

SUMMARY_INSTRUCTIONS = (
    "You maintain the running summary of a conversation between a user and an assistant. "
    "Merge the previous summary (if any) with the new messages into one concise summary that keeps "
    "facts, names, numbers, decisions, commitments, open questions and the user's stated preferences. "
    "Write compact notes (under 250 words) in the conversation's language. Output only the summary."
)
SUMMARY_MAX_TOKENS = 600
# For the compaction decision: a typical summary's length, the least history worth compacting,
# and how many future turns the saving is counted over at most.
SUMMARY_EXPECTED_TOKENS = 300
MIN_COMPACTION_TOKENS = 1024
HORIZON_TURNS = 40
# A conversation n turns old is expected to last at least n/5 more: compacting early in a short
# conversation costs more than it saves.
EXPECTED_MORE_TURNS = Decimal("0.2")


@dataclass(frozen=True)
class SummaryJob:
    tenant_id: int
    conversation_id: uuid.UUID
    previous_through_seq: int
    through_seq: int
    request: ChatRequest
    target: ProviderTarget
    price: Price
    prompt_tokens: int


def summary_needed(
    *, assistant: Assistant, history_tokens: int, truncated: bool, turns: int, price: Price | None = None
) -> bool:
    """Compact when the history passes the high-water mark (the hard bound that keeps a turn
    O(window)), or earlier when it pays: carrying the excess history costs its cached-input
    price on every turn, compacting costs the summary call plus one cache miss on what is
    kept. A conversation that has lasted n turns is expected to last at least n/5 more (capped),
    so short conversations are left alone and long ones are compacted early."""
    if assistant.history_strategy != Assistant.HistoryStrategy.SUMMARIZE:
        return False
    if truncated or history_tokens > assistant.summary_high_water_tokens:
        return True
    excess = history_tokens - assistant.summary_low_water_tokens
    if price is None or excess < MIN_COMPACTION_TOKENS:
        return False
    compaction = (
        excess * price.input
        + SUMMARY_EXPECTED_TOKENS * price.output
        + assistant.summary_low_water_tokens * (price.input - price.cached_input)
    )
    carrying = excess * price.cached_input * min(turns * EXPECTED_MORE_TURNS, HORIZON_TURNS)
    return carrying > compaction


def summary_claim(*, tenant_id: int, conversation_id: uuid.UUID) -> bool:
    now = timezone.now()
    return bool(
        Conversation.objects.for_tenant(tenant_id)
        .filter(Q(summary_claimed_until__isnull=True) | Q(summary_claimed_until__lt=now), pk=conversation_id)
        .update(summary_claimed_until=now + timedelta(seconds=settings.SUMMARY_CLAIM_SECONDS))
    )


def summary_release(*, conversation_id: uuid.UUID) -> None:
    Conversation.objects.filter(pk=conversation_id).update(summary_claimed_until=None)


def _cut(rows: list[tuple], low_water: int) -> int:
    """Index of the first message to keep: the newest messages within low_water, starting at a
    user message so a tool call is never separated from its results. 0 = nothing to compact."""
    kept = 0
    index = len(rows)
    while index > 0 and kept + rows[index - 1][-1] <= low_water:
        index -= 1
        kept += rows[index][-1]
    while index < len(rows) and rows[index][1] != Message.Role.USER:
        index += 1
    return index if index < len(rows) else 0


def _transcript(rows: list[tuple]) -> str:
    lines = []
    for _, role, content, tool_calls, _, _ in rows:
        if tool_calls:
            names = ", ".join(call.get("function", {}).get("name", "?") for call in tool_calls)
            lines.append(f"assistant called tools: {names}")
        if content:
            lines.append(f"{role}: {content}")
    return "\n".join(lines)


def summary_plan(*, tenant_id: int, conversation_id: uuid.UUID) -> SummaryJob | None:
    """What to compact, or None when the history is already under its low-water mark."""
    conversation = Conversation.objects.for_tenant(tenant_id).select_related("assistant").get(pk=conversation_id)
    assistant = conversation.assistant
    rows = list(
        Message.objects.filter(
            conversation_id=conversation.pk, seq__gt=conversation.summary_through_seq, status__in=REPLAYED_STATUSES
        )
        .exclude(role=Message.Role.SYSTEM)
        .order_by("seq")
        .values_list("seq", "role", "content", "tool_calls", "tool_call_id", "tokens")
    )
    keep_from = _cut(rows, assistant.summary_low_water_tokens)
    if keep_from == 0:
        return None
    compacted = rows[:keep_from]
    previous = f"Previous summary:\n{conversation.summary}\n\n" if conversation.summary else ""
    messages = [
        {"role": "system", "content": SUMMARY_INSTRUCTIONS},
        {"role": "user", "content": f"{previous}New messages:\n{_transcript(compacted)}"},
    ]
    model = assistant.summary_model
    return SummaryJob(
        tenant_id=tenant_id,
        conversation_id=conversation.pk,
        previous_through_seq=conversation.summary_through_seq,
        through_seq=compacted[-1][0],
        request=ChatRequest(model=model, messages=messages, max_tokens=SUMMARY_MAX_TOKENS, temperature=0.2),
        target=provider_target(assistant),
        price=price_for(model, tenant_id=tenant_id),
        prompt_tokens=count_messages(messages, model),
    )


def _bill(*, job: SummaryJob, hold: Hold, text: str, usage: Usage | None, outcome: str,
          error: BaseException | None = None) -> Decimal:
    record = call_book(
        hold=hold, usage=usage, error=error, content=text,
        facts=CallFacts(kind=UsageRecord.Kind.SUMMARY, outcome=outcome, conversation_id=job.conversation_id),
    )
    return record.cost_usd


def conversation_summarize(*, tenant_id: int, conversation_id: uuid.UUID) -> bool:
    """Compact one conversation's history if it needs it. True when a new summary was stored.
    Raises UpstreamError / CapExceeded for the task to retry or give up on; the claim is
    released either way."""
    if not summary_claim(tenant_id=tenant_id, conversation_id=conversation_id):
        return False
    try:
        job = summary_plan(tenant_id=tenant_id, conversation_id=conversation_id)
        if job is None:
            return False
        hold = call_hold(
            subject=Subject(tenant_id), price=job.price, model=job.request.model, prompt_tokens=job.prompt_tokens,
            max_tokens=SUMMARY_MAX_TOKENS, call_id=f"sum-{uuid.uuid4()}",
        )
        try:
            text, usage = asyncio.run(upstream_text(job.target, job.request))
        except BaseException as error:
            # A refusal costs nothing; anything else (timeouts, cut streams) our own count.
            with transaction.atomic():
                _bill(job=job, hold=hold, text="", usage=None, error=error, outcome=UsageRecord.Outcome.ERROR)
            raise
        with transaction.atomic():
            _bill(job=job, hold=hold, text=text, usage=usage, outcome=UsageRecord.Outcome.OK)
            if not text:
                return False
            return summary_store(job=job, text=text)
    finally:
        summary_release(conversation_id=conversation_id)


def summary_store(*, job: SummaryJob, text: str) -> bool:
    """Replace the summary only if nobody compacted this conversation meanwhile."""
    return bool(
        Conversation.objects.filter(pk=job.conversation_id, summary_through_seq=job.previous_through_seq).update(
            summary=text,
            summary_through_seq=job.through_seq,
            summary_tokens=count_text(text, job.request.model),
        )
    )


# How a summary is enqueued: the task module registers it (ConversationsConfig.ready), since
# the task calls into this module and this module must not import it back.
_summary_task: Callable[[int, str], object] | None = None


def summary_task_register(enqueue: Callable[[int, str], object]) -> None:
    global _summary_task
    _summary_task = enqueue


def summary_enqueue(*, tenant_id: int, conversation_id: uuid.UUID) -> None:
    enqueue = _summary_task
    if enqueue is None:
        raise RuntimeError("no summary task registered (ConversationsConfig.ready did not run)")
    transaction.on_commit(lambda: enqueue(tenant_id, str(conversation_id)))


