"""Answer storage: the short transactions after a generation's upstream calls (the answer or
a tool round stored, each call booked through billing.metering)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from django.db import transaction

from billing.caps import Subject
from billing.metering import CallFacts, Hold, call_book, call_hold, call_release
from billing.models import UsageRecord
from llm.gateway import Usage
from llm.tokens import count_message
from responsecache.chat import Hit, hit_book

from .models import Conversation, Message
from .services import generation_release
from .turns import CallOwner, TurnPlan, upstream_call_id

# --- after the stream ---------------------------------------------------------------------


@dataclass(frozen=True)
class TurnOutcome:
    """What the last upstream call of a turn produced: the provider's usage (None when it sent
    none) and how the call failed, if it did. Turns with tool rounds pass the round's hold and
    next free seq."""

    called_upstream: bool
    content: str
    status: str  # Message.Status
    finish_reason: str
    usage: Usage | None
    latency_ms: int
    ttft_ms: int | None
    usage_outcome: str = UsageRecord.Outcome.OK
    error: BaseException | None = None  # the call's failure: a provider refusal books $0
    streamed: bool = False  # anything arrived before it failed
    round_number: int = 0
    hold: Hold | None = None
    seq: int | None = None
    prompt_estimate: int | None = None  # our count of this call's prompt, when usage is missing


@dataclass(frozen=True)
class TurnResult:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: Decimal


def _bill_call(*, plan: CallOwner, outcome: TurnOutcome, message_id: uuid.UUID, content: str, hold: Hold) -> UsageRecord:
    """One upstream call booked: its UsageRecord, and its hold settled."""
    return call_book(
        hold=hold, usage=outcome.usage, error=outcome.error, streamed=outcome.streamed, content=content,
        prompt_tokens=outcome.prompt_estimate if outcome.prompt_estimate is not None else plan.prompt_tokens,
        facts=CallFacts(
            kind=UsageRecord.Kind.CHAT, outcome=outcome.usage_outcome, conversation_id=plan.conversation_id,
            message_id=message_id, latency_ms=outcome.latency_ms, ttft_ms=outcome.ttft_ms,
            **(plan.routed.ledger() if plan.routed else {}),
        ),
    )


def turn_finish(*, plan: TurnPlan, outcome: TurnOutcome) -> TurnResult:
    """Store the answer (complete or incomplete), bill the last call, release the conversation."""
    return answer_store(plan=plan.owner, outcome=replace(
        outcome,
        hold=outcome.hold or plan.hold,
        seq=outcome.seq if outcome.seq is not None else plan.user_seq + 1,
    ))


def answer_store(*, plan: CallOwner, outcome: TurnOutcome) -> TurnResult:
    """The one way an answer is stored: by its generation, or by the sweep when that died.
    `outcome` carries the answer's seq and the last call's hold."""
    hold, seq = outcome.hold, outcome.seq
    assert hold is not None and seq is not None
    with transaction.atomic():
        Message.objects.create(
            id=plan.assistant_message_id,
            tenant_id=plan.caller.tenant_id,
            conversation_id=plan.conversation_id,
            seq=seq,
            role=Message.Role.ASSISTANT,
            content=outcome.content,
            tokens=count_message({"role": "assistant", "content": outcome.content}, plan.model),
            model=plan.model,
            route=plan.routed.choice.route_name if plan.routed else "",
            status=outcome.status,
            finish_reason=outcome.finish_reason,
        )
        if not outcome.called_upstream:
            call_release(hold)
            generation_release(conversation_id=plan.conversation_id, generation_id=plan.assistant_message_id, last_seq=seq)
            return TurnResult(prompt_tokens=0, completion_tokens=0, cached_tokens=0, cost_usd=Decimal(0))
        record = _bill_call(
            plan=plan, outcome=outcome, message_id=plan.assistant_message_id, content=outcome.content, hold=hold,
        )
        generation_release(conversation_id=plan.conversation_id, generation_id=plan.assistant_message_id, last_seq=seq)
    return TurnResult(
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        cached_tokens=record.cached_tokens,
        cost_usd=record.cost_usd,
    )


@dataclass(frozen=True)
class ToolRoundRecord:
    """One finished tool round: the model's calls and what each returned."""

    outcome: TurnOutcome  # the upstream call that asked for the tools
    tool_calls: list[dict[str, Any]]  # OpenAI wire shape: {"id", "type", "function": {"name", "arguments"}}
    results: list[tuple[str, str]]  # (call_id, content) per call, in order


@dataclass(frozen=True)
class ToolRoundStored:
    messages: list[dict[str, Any]]  # what to append to the next request
    next_seq: int
    cost_usd: Decimal
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


def tool_round_commit(*, plan: TurnPlan, record: ToolRoundRecord) -> ToolRoundStored:
    """Store the assistant's tool calls and their results in order, and bill the call."""
    outcome = record.outcome
    seq = outcome.seq if outcome.seq is not None else plan.user_seq + 1
    call_message = {"role": "assistant", "content": outcome.content or None, "tool_calls": record.tool_calls}
    result_messages = [{"role": "tool", "tool_call_id": call_id, "content": content} for call_id, content in record.results]
    with transaction.atomic():
        call_message_id = uuid.uuid4()
        rows = [
            Message(
                id=call_message_id, tenant_id=plan.caller.tenant_id, conversation_id=plan.conversation_id, seq=seq,
                role=Message.Role.ASSISTANT, content=outcome.content, tool_calls=record.tool_calls,
                tokens=count_message(call_message, plan.model), model=plan.model, status=Message.Status.COMPLETE,
                finish_reason=outcome.finish_reason,
            )
        ]
        for offset, message in enumerate(result_messages, start=1):
            rows.append(
                Message(
                    tenant_id=plan.caller.tenant_id, conversation_id=plan.conversation_id, seq=seq + offset,
                    role=Message.Role.TOOL, content=message["content"], tool_call_id=message["tool_call_id"],
                    tokens=count_message(message, plan.model), status=Message.Status.COMPLETE,
                )
            )
        Message.objects.bulk_create(rows)
        next_seq = seq + len(rows)
        Conversation.objects.filter(pk=plan.conversation_id).update(last_seq=next_seq - 1)
        usage = _bill_call(
            plan=plan.owner, outcome=outcome, message_id=call_message_id, content=outcome.content,
            hold=outcome.hold or plan.hold,
        )
    return ToolRoundStored(
        messages=[call_message, *result_messages],
        next_seq=next_seq,
        cost_usd=usage.cost_usd,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
    )


def turn_cached(*, plan: TurnPlan, hit: Hit) -> TurnResult:
    """A response-cache hit stored as the answer: no model call, its hold returned, one $0
    ledger row (kind `cached`) with what the call would have cost, the conversation released."""
    seq = plan.user_seq + 1
    author = hit.model or plan.model  # the message names the model whose answer it serves
    with transaction.atomic():
        Message.objects.create(
            id=plan.assistant_message_id, tenant_id=plan.caller.tenant_id, conversation_id=plan.conversation_id,
            seq=seq, role=Message.Role.ASSISTANT, content=hit.answer, model=author, cached=True,
            tokens=count_message({"role": "assistant", "content": hit.answer}, author),
            status=Message.Status.COMPLETE, finish_reason=hit.finish_reason,
        )
        call_release(plan.hold)
        # The saving is against the model asked for: a route's cheaper choice is not what the
        # hit spared (the answer was stored for this assistant version, routes included).
        asked = plan.routed.requested_price if plan.routed is not None else plan.price
        record = hit_book(
            subject=plan.caller, call_id=f"cache-{plan.assistant_message_id}",
            model=(plan.routed.choice.requested_model if plan.routed is not None else "") or plan.model, price=asked,
            prompt_tokens=plan.prompt.tokens, hit=hit, conversation_id=plan.conversation_id,
            message_id=plan.assistant_message_id,
        )
        generation_release(conversation_id=plan.conversation_id, generation_id=plan.assistant_message_id, last_seq=seq)
    return TurnResult(record.prompt_tokens, record.completion_tokens, cached_tokens=0, cost_usd=record.cost_usd)


def turn_input_blocked(*, plan: TurnPlan) -> None:
    """Input moderation blocked the turn before any model call: the user's message is kept,
    marked for review, and never sent upstream; nothing was spent."""
    with transaction.atomic():
        Message.objects.filter(pk=plan.user_message_id).update(status=Message.Status.BLOCKED)
        call_release(plan.hold)
        generation_release(conversation_id=plan.conversation_id, generation_id=plan.assistant_message_id)


def round_reserve(*, plan: TurnPlan, round_number: int, prompt_tokens: int) -> Hold:
    """Hold the worst case of a turn's next upstream call. Raises CapExceeded."""
    with transaction.atomic():
        return call_hold(
            subject=Subject(plan.caller.tenant_id, plan.caller.end_user_id, plan.caller.api_key_id),
            price=plan.price, model=plan.model, prompt_tokens=prompt_tokens, max_tokens=plan.request.max_tokens,
            call_id=upstream_call_id(plan.assistant_message_id, round_number),
        )
