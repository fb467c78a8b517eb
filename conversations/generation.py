"""One assistant answer: a turn loop over upstream rounds, the output gate and the control channel.

Each round is one upstream call (`upstream.upstream_round`) whose text passes the tenant's
output gate (`moderation.gate`) before it is published; a round that asks for tools runs them,
stores the round and reserves the next call. The control channel (`control.Control`) stops
the turn on a cancel, a shutdown or the time budget. What streamed is always stored and billed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings

from billing.caps import CapExceeded
from billing.metering import Hold
from billing.models import UsageRecord
from billing.services import money_str
from config.db import database_sync_to_async
from llm.gateway import ChatRequest, UpstreamError
from llm.tokens import count_messages
from moderation.gate import OutputGate
from moderation.services import ModerationContext, moderate
from streaming import eventlog, outages
from tools.calls import ToolContext
from tools.execution import tool_calls_execute
from tools.rounds import arguments_object, wire_tool_calls

from . import answers, recovery, services, summaries
from .answers import ToolRoundRecord, TurnOutcome, TurnResult
from .cached_turns import CachedTurn
from .control import CANCELLED, Control
from .models import Message
from .protocol import (
    ConversationCreated,
    Delta,
    ErrorEvent,
    Event,
    MessageAccepted,
    MessageCompleted,
    MessageStarted,
    ToolCall,
    ToolResult,
    error_event_for,
)
from .turns import TurnPlan
from .upstream import RoundOutput, upstream_round

logger = logging.getLogger(__name__)

# Why a turn stopped before the model finished it (besides a cancel): the finish reasons of an
# answer stored `incomplete` and sent as `message.completed`, with its usage and cost.
TOOL_ROUNDS_EXHAUSTED = "tool_rounds_exhausted"  # still calling tools after tool_choice "none"

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens")


@dataclass
class TurnRound:
    """The current upstream call of a turn (one per tool round) and what it streamed."""

    number: int
    hold: Hold
    prompt_tokens: int  # our count of its prompt
    seq: int  # where its answer is stored
    called: bool = False
    parts: list[str] = field(default_factory=list)
    output: RoundOutput = field(default_factory=RoundOutput)


@dataclass
class Spent:
    """Billed by the earlier rounds of this turn, added into message.completed."""

    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_KEYS, 0))
    cost: Decimal = Decimal(0)

    def add(self, stored: Any) -> None:
        for key in USAGE_KEYS:
            self.usage[key] += getattr(stored, key)
        self.cost += stored.cost_usd

    def completed(self, *, message_id: str, finish_reason: str, last: TurnResult) -> MessageCompleted:
        return MessageCompleted(
            message_id=message_id, finish_reason=finish_reason,
            usage={key: getattr(last, key) + self.usage[key] for key in USAGE_KEYS},
            cost_usd=money_str(last.cost_usd + self.cost),
        )


class AnswerLog:
    """Where a generation's events go: the conversation's log, through an outbox that holds
    them while the log (Redis) is away, so the answer goes on and is stored."""

    def __init__(self, plan: TurnPlan) -> None:
        self.message_id = str(plan.assistant_message_id)
        self.outbox = outages.EventOutbox(eventlog.log_key(plan.group))
        self.parts: list[str] = []  # every round's text: what joiners are shown
        self.first_token_at: float | None = None

    @property
    def content(self) -> str:
        return "".join(self.parts)

    async def publish(self, event: Event) -> None:
        await self.outbox.append(event.as_dict())

    async def delta(self, content: str, *, round_parts: list[str]) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.parts.append(content)
        round_parts.append(content)
        # Not awaited to the log: deltas queued behind a slow append go out merged as one.
        await self.outbox.append(Delta(message_id=self.message_id, content=content).as_dict(), wait=False)


class Generation:
    """One assistant answer: stream, publish, store, bill."""

    def __init__(self, *, plan: TurnPlan, control_channel: str) -> None:
        self.plan = plan
        self.control = Control(control_channel, name=str(plan.assistant_message_id))
        self.subject = plan.caller
        self.gate = OutputGate(
            policy=plan.moderation, target=plan.target, subject=self.subject,
            context=ModerationContext(plan.conversation_id, plan.assistant_message_id),
        )
        self.round = TurnRound(
            number=0, hold=plan.hold, prompt_tokens=plan.prompt.tokens, seq=plan.user_seq + 1,
        )
        self.log = AnswerLog(plan)
        self.spent = Spent()
        self.limit_reason = ""  # a limit of Parley's ended the turn (not a stop)
        self.cache = CachedTurn(plan)  # the response cache, when the turn is cacheable
        self.started = time.monotonic()

    @property
    def message_id(self) -> str:
        return str(self.plan.assistant_message_id)

    @property
    def stop_reason(self) -> str:
        """"cancelled", or why Parley ended the turn early; "" when the model finished it."""
        return self.control.reason or self.limit_reason

    def cancel(self) -> None:
        self.control.cancel()

    def interrupt(self) -> None:
        self.control.interrupt()

    async def run(self) -> None:
        listener = asyncio.create_task(self.control.listen())
        # No generation runs unowned forever, whatever the model or the tools do.
        budget = asyncio.get_running_loop().call_later(settings.GENERATION_MAX_SECONDS, self.control.out_of_time)
        try:
            await self._announce()
            if not await self._input_allowed() or await self.cache.served(self.subject, self.log, self.spent):
                return
            error = await self._stream()
            await self._finish(error)
            if self.plan.summary_due:
                await self._enqueue_summary()
        except Exception:  # the task is detached: nothing above us would see this
            logger.exception("generation %s failed", self.message_id)
            await self._abandon()
        finally:
            budget.cancel()
            # Every reader gets a terminal event: what waited for the log goes out now, or,
            # when Redis stays away past the retries, from the background once it is back.
            if not await self.log.outbox.drain():
                outages.deliver_later(self.log.outbox)
            await self.control.close(listener)

    async def _enqueue_summary(self) -> None:
        # Not in the thread-sensitive executor: with eager Celery (embedded mode) the summary
        # runs right here and must not hold up every other socket's database work. A summary
        # that cannot run never fails the turn: trimming keeps the next prompt in budget.
        try:
            await sync_to_async(summaries.summary_enqueue, thread_sensitive=False)(
                tenant_id=self.plan.caller.tenant_id, conversation_id=self.plan.conversation_id
            )
        except Exception:
            logger.warning("summary for conversation %s not started", self.plan.conversation_id, exc_info=True)

    async def _announce(self) -> None:
        plan = self.plan
        await self._round_record(0, plan.prompt.tokens)
        if plan.conversation_created:
            await self.log.publish(ConversationCreated(id=str(plan.conversation_id)))
        await self.log.publish(
            MessageAccepted(message_id=str(plan.user_message_id), client_msg_id=plan.client_msg_id),
        )
        await self.log.publish(MessageStarted(message_id=self.message_id, model=plan.model))

    async def _round_record(self, round_number: int, prompt_tokens: int) -> None:
        # Only the sweep of a dead process needs it: a log outage must not stop the answer.
        try:
            await recovery.round_record(self.plan, round_number=round_number, prompt_tokens=prompt_tokens)
        except eventlog.LOG_ERRORS:
            logger.warning("generation %s: round %d not recorded in the log", self.message_id, round_number)

    async def _input_allowed(self) -> bool:
        plan = self.plan
        verdict = await moderate(
            policy=plan.moderation, direction="input", text=plan.user_content, target=plan.target,
            subject=self.subject, context=ModerationContext(plan.conversation_id, plan.user_message_id),
        )
        if not verdict.blocked:
            return True
        await database_sync_to_async(answers.turn_input_blocked)(plan=plan)
        await self.log.publish(ErrorEvent(
            code="moderation_blocked", message="this message was blocked by the content policy",
            message_id=self.message_id,
        ))
        return False

    async def _stream(self) -> UpstreamError | CapExceeded | None:
        try:
            await self.control.run(self._rounds())
        except (UpstreamError, CapExceeded) as error:
            return error
        return None

    async def _rounds(self) -> None:
        """The turn loop: call the model, run the tools it asks for, call it again."""
        request = self.plan.request
        while True:
            await self._call(request)
            if not self.round.output.tool_calls or self.control.stopped or self.gate.blocked:
                return
            if self.round.number >= self.plan.max_tool_rounds:
                # The model was told tool_choice "none" and called tools anyway (many
                # OpenAI-compatible servers ignore it): its calls are not run, the turn ends.
                self.limit_reason = TOOL_ROUNDS_EXHAUSTED
                return
            request = await self._tool_round(request)

    async def _call(self, request: ChatRequest) -> None:
        self.round.called = True
        await upstream_round(self.plan.target, request, self.round.output, deliver=self._deliver, control=self.control)
        if self.gate.by_sentence and not self.control.stopped and not self.gate.blocked:
            rest = await self.gate.rest()  # the last sentence, when the answer did not end with one
            if rest:
                await self._publish_delta(rest)
        if self.gate.blocked:
            self.round.parts.append(self.gate.blocked_sentence or "")  # stored for review, never sent

    async def _deliver(self, content: str) -> bool:
        """Publish a delta, or with sentence checks on, each sentence once it is complete and
        has passed. False when a sentence was blocked: the answer stops there."""
        if not self.gate.by_sentence:
            await self._publish_delta(content)
            return True
        async for sentence in self.gate.passed(content):
            if sentence:
                await self._publish_delta(sentence)
        return not self.gate.blocked

    async def _publish_delta(self, content: str) -> None:
        await self.log.delta(content, round_parts=self.round.parts)

    async def _tool_round(self, request: ChatRequest) -> ChatRequest:
        """Run the calls the model just made, store the round, reserve the next call; the
        next request."""
        plan = self.plan
        requests = self.round.output.tool_calls.requests()
        context = ToolContext(
            conversation_id=plan.conversation_id, end_user_external_id=plan.end_user_external_id,
            tenant_id=plan.caller.tenant_id,
        )
        with self.control.interruptible():
            # Validated, then the valid calls run concurrently; a tool's failure is an answer
            # for the model, never an exception here.
            outcomes = await tool_calls_execute(
                tenant_id=plan.caller.tenant_id, calls=requests, context=context, names=plan.tool_names
            )
        for call, outcome in zip(requests, outcomes, strict=True):
            await self.log.publish(ToolCall(
                message_id=self.message_id, call_id=call.call_id, name=call.name,
                arguments=arguments_object(call, outcome),
            ))
        for outcome in outcomes:
            await self.log.publish(ToolResult(call_id=outcome.call_id, ok=outcome.ok))
        record = ToolRoundRecord(
            outcome=self._outcome(None), tool_calls=wire_tool_calls(requests),
            results=[(o.call_id, o.content) for o in outcomes],
        )
        stored = await database_sync_to_async(answers.tool_round_commit)(plan=plan, record=record)
        self.spent.add(stored)
        await self._next_round(record, next_seq=stored.next_seq)
        last_round = self.round.number >= plan.max_tool_rounds
        return replace(
            request,
            messages=[*request.messages, *stored.messages],
            # Out of rounds: the model must answer with what it has.
            tool_choice="none" if last_round else request.tool_choice,
            parallel_tool_calls=None if last_round else request.parallel_tool_calls,
        )

    async def _next_round(self, record: ToolRoundRecord, *, next_seq: int) -> None:
        plan = self.plan
        appended_tokens = count_messages(
            [{"role": "assistant", "content": None, "tool_calls": record.tool_calls}]
            + [{"role": "tool", "tool_call_id": c, "content": t} for c, t in record.results],
            plan.model,
        )
        # The new round starts before its reservation: a refused one is a round never called,
        # stored empty at its seq and billed nothing.
        self.round = TurnRound(
            number=self.round.number + 1, hold=self.round.hold,
            prompt_tokens=self.round.prompt_tokens + appended_tokens, seq=next_seq,
        )
        # Every upstream call of the loop draws on the caps; a refusal ends the turn here.
        self.round.hold = await database_sync_to_async(answers.round_reserve)(
            plan=plan, round_number=self.round.number, prompt_tokens=self.round.prompt_tokens
        )
        await self._round_record(self.round.number, self.round.prompt_tokens)

    def _outcome(self, error: UpstreamError | CapExceeded | None) -> TurnOutcome:
        now, turn_round = time.monotonic(), self.round
        complete = error is None and not self.stop_reason
        if complete:
            finish_reason, outcome = turn_round.output.finish_reason, UsageRecord.Outcome.OK
        elif error is None and self.stop_reason == TOOL_ROUNDS_EXHAUSTED:
            finish_reason, outcome = TOOL_ROUNDS_EXHAUSTED, UsageRecord.Outcome.OK  # the call itself finished
        elif self.control.stopped:
            finish_reason, outcome = self.stop_reason, UsageRecord.Outcome.CANCELLED
        else:
            finish_reason, outcome = "error", UsageRecord.Outcome.ERROR
        return TurnOutcome(
            called_upstream=turn_round.called,
            content="".join(turn_round.parts),
            status=Message.Status.COMPLETE if complete else Message.Status.INCOMPLETE,
            finish_reason=finish_reason,
            usage=turn_round.output.usage,
            error=error,
            streamed=bool(turn_round.parts),
            latency_ms=int((now - self.started) * 1000),
            ttft_ms=int((self.log.first_token_at - self.started) * 1000) if self.log.first_token_at else None,
            usage_outcome=outcome,
            round_number=turn_round.number,
            hold=turn_round.hold,
            seq=turn_round.seq,
            prompt_estimate=turn_round.prompt_tokens,
        )

    async def _finish(self, error: UpstreamError | CapExceeded | None) -> None:
        outcome = self._outcome(error)
        blocked = self.gate.blocked or (
            error is None and not self.control.stopped and not self.gate.by_sentence
            and await self.gate.blocks(self.log.content)
        )
        if blocked:
            # Kept for review, never replayed to the model; the end user gets the notice.
            outcome = replace(outcome, status=Message.Status.BLOCKED)
        # PostgreSQL restarting must not lose the answer: the store is retried for a while.
        result = await outages.outlast(
            lambda: database_sync_to_async(answers.turn_finish)(plan=self.plan, outcome=outcome),
            what=f"storing answer {self.message_id}",
        )
        await self.log.publish(self._terminal(error, blocked=blocked, result=result))
        await self.cache.keep(outcome, result, rounds=self.round.number)

    def _terminal(self, error: UpstreamError | CapExceeded | None, *, blocked: bool, result: TurnResult) -> Event:
        if blocked:
            notice = self.plan.moderation.notice if self.plan.moderation else ""
            return ErrorEvent(code="moderation_blocked", message=notice, message_id=self.message_id)
        if self.stop_reason == CANCELLED:
            return ErrorEvent(code="cancelled", message="generation cancelled", message_id=self.message_id)
        if error is not None:
            return error_event_for(error, message_id=self.message_id)
        # Ended by a limit of Parley's (stop_reason), not by a failure: the answer so far is
        # the reply, sent with what it cost.
        return self.spent.completed(
            message_id=self.message_id, finish_reason=self.stop_reason or self.round.output.finish_reason, last=result,
        )

    async def _abandon(self) -> None:
        """Last resort after an unexpected failure: free the conversation and tell the sockets.
        When the database is away the claim stays; the sweep frees it once its heartbeat is stale."""
        try:
            await database_sync_to_async(services.generation_release)(
                conversation_id=self.plan.conversation_id, generation_id=self.plan.assistant_message_id
            )
        except Exception:
            logger.exception("could not release generation %s", self.message_id)
        await self.log.publish(ErrorEvent(code="upstream_error", message="the reply failed", message_id=self.message_id))
