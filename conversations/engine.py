"""The chat engine: plain async Python between the wire surfaces and the services.

A generation belongs to its conversation, not to the socket that asked for it: it runs as a
detached task and appends every event to the conversation's event log (eventlog.py), so any
number of readers in any web process see the same stream from offsets of their own, a slow
reader catches up instead of losing events, and a dropped socket neither stops nor loses it.
Each generation listens on a control channel of its own (stored on the conversation) for
`cancel`; its claim on the conversation carries a heartbeat, so when its process dies the
sweep (recovery.py) finishes the bookkeeping from the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from billing.caps import CapExceeded, Subject
from billing.models import UsageRecord
from billing.services import money_str, usage_billed
from config.db import database_sync_to_async
from llm import gateway
from llm.gateway import ChatRequest, Finish, TextDelta, ToolCallDelta, UpstreamError, Usage
from llm.tokens import count_messages
from moderation.sentences import SentenceSplitter
from moderation.services import ModerationContext, moderate
from tools.calls import ToolContext
from tools.execution import tool_calls_execute

from . import eventlog, fanout, outages, recovery, services, shutdown, summaries
from .models import Message
from .protocol import (
    ConversationCreated,
    ConversationState,
    Delta,
    ErrorEvent,
    Event,
    MessageAccepted,
    MessageCompleted,
    MessageCreate,
    MessageStarted,
    ToolCall,
    ToolResult,
    error_event_for,
)
from .services import Caller, ToolRoundRecord, TurnOutcome, TurnPlan
from .tool_rounds import ToolCallAssembler, arguments_object, wire_tool_calls

logger = logging.getLogger(__name__)

# Control messages ride the channel layer, to a generation's own channel: they are few, and a
# lost one is a cancel the user repeats. Events never do: they go to the event log.
CONTROL_CANCEL = "generation.cancel"
CONTROL_STOP = "generation.stop"

# Why a turn stopped before the model finished it (besides a cancel): the finish reasons of an
# answer stored `incomplete` and sent as `message.completed`, with its usage and cost.
TOOL_ROUNDS_EXHAUSTED = "tool_rounds_exhausted"  # still calling tools after tool_choice "none"
TIME_BUDGET_EXHAUSTED = "time_budget_exhausted"  # past GENERATION_MAX_SECONDS

# The generations running in this process, by task (strong references: the event loop keeps
# only weak ones).
_running: dict[asyncio.Task, Generation] = {}


def generations_running() -> set[asyncio.Task]:
    return set(_running)


def generations_interrupt() -> None:
    """Shutdown: stop every running generation here; each stores and bills what streamed."""
    for generation in _running.values():
        generation.interrupt()


async def publish(plan: TurnPlan, event: Event) -> str:
    """Append to the conversation's log; returns the event's offset. Never waits for readers."""
    return await eventlog.event_log().append(eventlog.log_key(plan.group), event.as_dict())


async def events_follow(key: str, after: str) -> AsyncIterator[eventlog.Entry]:
    """Every wire event of the log after `after`, in order, then each as it is appended;
    runs until cancelled. A Redis outage pauses it: it resumes from the same offset."""
    async for offset, event in fanout.fanout().follow(key, after):
        if event.get("type") not in recovery.INTERNAL_EVENTS:
            yield offset, event


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
    plan = await database_sync_to_async(services.turn_prepare)(
        caller=caller,
        content=command.content,
        conversation_id=command.conversation_id,
        assistant_slug=command.assistant,
        client_msg_id=command.client_msg_id,
        control_channel=control,
    )
    generation = Generation(plan=plan, control_channel=control)
    task = asyncio.create_task(generation.run(), name=f"generation {plan.assistant_message_id}")
    _running[task] = generation
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
    await get_channel_layer().send(control, {"type": CONTROL_CANCEL})
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
    conversation = await database_sync_to_async(services.access_conversation)(
        caller=caller, conversation_id=conversation_id
    )
    await recovery.conversation_recover(caller=caller, conversation_id=conversation.id)
    key = eventlog.log_key(services.group_name(tenant_id=caller.tenant_id, conversation_id=conversation.id))
    entries = await eventlog.read_all(eventlog.event_log(), key)
    offset = entries[-1][0] if entries else eventlog.START
    state = recovery.state_from_log(conversation.id, [event for _, event in entries], with_content=after is None)
    return Joined(key=key, state=state, offset=offset, after=offset if after is None else after)


class Generation:
    """One assistant answer: stream, publish, store, bill."""

    def __init__(self, *, plan: TurnPlan, control_channel: str) -> None:
        self.plan = plan
        self.control_channel = control_channel
        self.content_parts: list[str] = []  # every round's text: what joiners are shown
        # The current upstream call (one per tool round).
        self.round_number = 0
        self.round_parts: list[str] = []
        self.round_reservation = plan.reservation
        self.round_called = False
        self.round_prompt_tokens = plan.prompt.tokens
        self.next_seq = plan.user_seq + 1
        self.tool_calls = ToolCallAssembler()
        self.finish_reason = ""
        self.usage: Usage | None = None
        # Billed by earlier rounds of this turn, added into message.completed.
        self.earlier = {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0}
        self.earlier_cost = Decimal(0)
        self.cancelled = False  # asked to stop now: by a cancel or by the time budget
        self.stop_reason = ""  # "cancelled", or why Parley ended the turn early
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self._stream_task: asyncio.Task | None = None
        self._interruptible = False
        # Output moderation per sentence as it streams, when the tenant's policy asks.
        policy = plan.moderation
        self.splitter = (
            SentenceSplitter() if policy and policy.check_output and policy.stream_check_sentences else None
        )
        self.output_blocked = False
        # Held while a delta is appended and published, and while a state reply is built and
        # sent: a joiner's state then either includes a delta whose publish already finished,
        # or excludes it and is delivered before it (the joiner drops deltas until its state).
        self._publish_lock = asyncio.Lock()
        # Events wait here while the log (Redis) is away: the answer goes on and is stored.
        self.outbox = outages.EventOutbox(eventlog.log_key(plan.group))

    async def _publish(self, event: Event) -> None:
        await self.outbox.append(event.as_dict())

    @property
    def message_id(self) -> str:
        return str(self.plan.assistant_message_id)

    @property
    def content(self) -> str:
        return "".join(self.content_parts)

    async def run(self) -> None:
        listener = asyncio.create_task(self._listen())
        # No generation runs unowned forever, whatever the model or the tools do.
        budget = asyncio.get_running_loop().call_later(settings.GENERATION_MAX_SECONDS, self._out_of_time)
        try:
            await self._announce()
            if not await self._input_allowed():
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
            # Every reader gets a terminal event: what waited for the log goes out now.
            await self.outbox.drain()
            await self._stop_listening(listener)

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

    async def _stop_listening(self, listener: asyncio.Task) -> None:
        # Never cancel a channels_redis receive: it pops from a list shared by every channel
        # of this process, and a receive cancelled mid-pop drops a socket's message. Ask the
        # listener to return instead.
        try:
            await get_channel_layer().send(self.control_channel, {"type": CONTROL_STOP})
            await asyncio.wait_for(asyncio.shield(listener), timeout=10)
        except Exception:
            logger.warning("generation %s: control listener did not stop cleanly", self.message_id)
            listener.cancel()

    async def _announce(self) -> None:
        plan = self.plan
        await self._round_record(0, plan.prompt.tokens)
        if plan.conversation_created:
            await self._publish(ConversationCreated(id=str(plan.conversation_id)))
        await self._publish(
            MessageAccepted(message_id=str(plan.user_message_id), client_msg_id=plan.client_msg_id),
        )
        await self._publish(MessageStarted(message_id=self.message_id, model=plan.model))

    async def _round_record(self, round_number: int, prompt_tokens: int) -> None:
        # Only the sweep of a dead process needs it: a log outage must not stop the answer.
        try:
            await recovery.round_record(self.plan, round_number=round_number, prompt_tokens=prompt_tokens)
        except eventlog.LOG_ERRORS:
            logger.warning("generation %s: round %d not recorded in the log", self.message_id, round_number)

    def _subject(self) -> Subject:
        caller = self.plan.caller
        return Subject(caller.tenant_id, caller.end_user_id, caller.api_key_id)

    async def _input_allowed(self) -> bool:
        plan = self.plan
        verdict = await moderate(
            policy=plan.moderation, direction="input", text=plan.user_content, target=plan.target,
            subject=self._subject(), context=ModerationContext(plan.conversation_id, plan.user_message_id),
        )
        if not verdict.blocked:
            return True
        await database_sync_to_async(services.turn_input_blocked)(plan=plan)
        await self._publish(ErrorEvent(
            code="moderation_blocked", message="this message was blocked by the content policy",
            message_id=self.message_id,
        ))
        return False

    async def _output_blocked(self, text: str) -> bool:
        plan = self.plan
        verdict = await moderate(
            policy=plan.moderation, direction="output", text=text, target=plan.target,
            subject=self._subject(), context=ModerationContext(plan.conversation_id, plan.assistant_message_id),
        )
        return verdict.blocked

    async def _stream(self) -> UpstreamError | CapExceeded | None:
        if self.cancelled:
            return None
        self._stream_task = asyncio.create_task(self._consume())
        try:
            await self._stream_task
        except asyncio.CancelledError:
            if not self.cancelled:
                raise
        except (UpstreamError, CapExceeded) as error:
            return error
        return None

    async def _consume(self) -> None:
        request = self.plan.request
        while True:
            await self._call(request)
            if not self.tool_calls or self.cancelled or self.output_blocked:
                return
            if self.round_number >= self.plan.max_tool_rounds:
                # The model was told tool_choice "none" and called tools anyway (many
                # OpenAI-compatible servers ignore it): its calls are not run, the turn ends.
                self.stop_reason = TOOL_ROUNDS_EXHAUSTED
                return
            appended = await self._tool_round()
            last_round = self.round_number >= self.plan.max_tool_rounds
            request = replace(
                request,
                messages=[*request.messages, *appended],
                # Out of rounds: the model must answer with what it has.
                tool_choice="none" if last_round else request.tool_choice,
                parallel_tool_calls=None if last_round else request.parallel_tool_calls,
            )

    async def _call(self, request: ChatRequest) -> None:
        self.round_called = True
        events = gateway.stream_chat(self.plan.target, request).__aiter__()
        try:
            while not self.cancelled:
                # Cancel interrupts only this wait for the model: never a publish halfway, so
                # what is stored is exactly what the sockets were sent.
                self._interruptible = True
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    self._interruptible = False
                self._take(event)
                if isinstance(event, TextDelta) and not await self._deliver(event.content):
                    return
            if self.splitter is not None and not self.cancelled:
                await self._deliver_sentence(self.splitter.flush())
        finally:
            await events.aclose()

    async def _deliver(self, content: str) -> bool:
        """Publish a delta, or with sentence checks on, each sentence once it is complete and
        has passed. False when a sentence was blocked: the answer stops there."""
        if self.splitter is None:
            await self._publish_delta(content)
            return True
        for sentence in self.splitter.feed(content):
            if not await self._deliver_sentence(sentence):
                return False
        return True

    async def _deliver_sentence(self, sentence: str) -> bool:
        if not sentence:
            return True
        if await self._output_blocked(sentence):
            self.output_blocked = True
            self.round_parts.append(sentence)  # stored for review, never sent
            return False
        await self._publish_delta(sentence)
        return True

    def _take(self, event: Any) -> None:
        if isinstance(event, ToolCallDelta):
            self.tool_calls.add(event)
        elif isinstance(event, Finish):
            self.finish_reason = event.reason
        elif isinstance(event, Usage):
            self.usage = event

    async def _publish_delta(self, content: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        async with self._publish_lock:
            self.content_parts.append(content)
            self.round_parts.append(content)
            await self._publish(Delta(message_id=self.message_id, content=content))

    async def _tool_round(self) -> list[dict[str, Any]]:
        """Run the calls the model just made, store the round, reserve the next call."""
        plan = self.plan
        requests = self.tool_calls.requests()
        context = ToolContext(
            conversation_id=plan.conversation_id, end_user_external_id=plan.end_user_external_id,
            tenant_id=plan.caller.tenant_id,
        )
        self._interruptible = True
        try:
            # Validated, then the valid calls run concurrently; a tool's failure is an answer
            # for the model, never an exception here.
            outcomes = await tool_calls_execute(
                tenant_id=plan.caller.tenant_id, calls=requests, context=context, names=plan.tool_names
            )
        finally:
            self._interruptible = False
        for request, outcome in zip(requests, outcomes, strict=True):
            await self._publish(ToolCall(
                message_id=self.message_id, call_id=request.call_id, name=request.name,
                arguments=arguments_object(request, outcome),
            ))
        for outcome in outcomes:
            await self._publish(ToolResult(call_id=outcome.call_id, ok=outcome.ok))
        record = ToolRoundRecord(
            outcome=self._outcome(None),
            tool_calls=wire_tool_calls(requests),
            results=[(o.call_id, o.content) for o in outcomes],
        )
        appended_tokens = count_messages(
            [{"role": "assistant", "content": None, "tool_calls": record.tool_calls}]
            + [{"role": "tool", "tool_call_id": c, "content": t} for c, t in record.results],
            plan.model,
        )
        stored = await database_sync_to_async(services.tool_round_commit)(plan=plan, record=record)
        for key in self.earlier:
            self.earlier[key] += getattr(stored, key)
        self.earlier_cost += stored.cost_usd
        self.round_number += 1
        self.round_called = False
        self.round_parts, self.usage, self.finish_reason = [], None, ""
        self.next_seq = stored.next_seq
        self.round_prompt_tokens += appended_tokens
        self.tool_calls = ToolCallAssembler()
        # Every upstream call of the loop draws on the caps; a refusal ends the turn here.
        self.round_reservation = await database_sync_to_async(services.round_reserve)(
            plan=plan, round_number=self.round_number, prompt_tokens=self.round_prompt_tokens
        )
        await self._round_record(self.round_number, self.round_prompt_tokens)
        return stored.messages

    async def _listen(self) -> None:
        layer = get_channel_layer()
        while True:
            message = await layer.receive(self.control_channel)  # waits out a Redis restart
            kind = message.get("type")
            if kind == CONTROL_STOP:
                return
            if kind == CONTROL_CANCEL:
                self.cancel()

    def cancel(self) -> None:
        self._stop("cancelled")

    def interrupt(self) -> None:
        """The process shuts down: end `incomplete` with what streamed, as a dead one is stored."""
        self._stop(recovery.INTERRUPTED)

    def _out_of_time(self) -> None:
        logger.warning("generation %s ran out of its time budget", self.message_id)
        self._stop(TIME_BUDGET_EXHAUSTED)

    def _stop(self, reason: str) -> None:
        if self.cancelled or (self._stream_task is not None and self._stream_task.done()):
            return
        self.cancelled, self.stop_reason = True, reason
        # Before the upstream call, it will not be made; waiting on the model or on tools,
        # stop now; otherwise at the next check (never a publish halfway).
        if self._stream_task is not None and self._interruptible:
            self._stream_task.cancel()

    def _outcome(self, error: UpstreamError | CapExceeded | None) -> TurnOutcome:
        now = time.monotonic()
        complete = error is None and not self.stop_reason
        usage = usage_billed(usage=self.usage, error=error, streamed=bool(self.round_parts))
        if complete:
            finish_reason, outcome = self.finish_reason, UsageRecord.Outcome.OK
        elif error is None and self.stop_reason == TOOL_ROUNDS_EXHAUSTED:
            finish_reason, outcome = TOOL_ROUNDS_EXHAUSTED, UsageRecord.Outcome.OK  # the call itself finished
        elif self.cancelled:
            finish_reason, outcome = self.stop_reason, UsageRecord.Outcome.CANCELLED
        else:
            finish_reason, outcome = "error", UsageRecord.Outcome.ERROR
        return TurnOutcome(
            called_upstream=self.round_called,
            content="".join(self.round_parts),
            status=Message.Status.COMPLETE if complete else Message.Status.INCOMPLETE,
            finish_reason=finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            cached_tokens=usage.cached_tokens if usage else 0,
            latency_ms=int((now - self.started) * 1000),
            ttft_ms=int((self.first_token_at - self.started) * 1000) if self.first_token_at else None,
            usage_outcome=outcome,
            round_number=self.round_number,
            reservation=self.round_reservation,
            seq=self.next_seq,
            prompt_estimate=self.round_prompt_tokens,
        )

    async def _finish(self, error: UpstreamError | CapExceeded | None) -> None:
        outcome = self._outcome(error)
        blocked = self.output_blocked or (
            error is None and not self.cancelled and self.splitter is None and await self._output_blocked(self.content)
        )
        if blocked:
            # Kept for review, never replayed to the model; the end user gets the notice.
            outcome = replace(outcome, status=Message.Status.BLOCKED)
        # PostgreSQL restarting must not lose the answer: the store is retried for a while.
        result = await outages.outlast(
            lambda: database_sync_to_async(services.turn_finish)(plan=self.plan, outcome=outcome),
            what=f"storing answer {self.message_id}",
        )
        if blocked:
            notice = self.plan.moderation.notice if self.plan.moderation else ""
            await self._publish(ErrorEvent(code="moderation_blocked", message=notice, message_id=self.message_id))
            return
        if self.stop_reason == "cancelled":
            await self._publish(ErrorEvent(code="cancelled", message="generation cancelled", message_id=self.message_id))
        elif error is not None:
            await self._publish(error_event_for(error, message_id=self.message_id))
        else:
            # Ended by a limit of Parley's (stop_reason), not by a failure: the answer so far is
            # the reply, sent with what it cost.
            await self._publish(
                MessageCompleted(
                    message_id=self.message_id,
                    finish_reason=self.stop_reason or self.finish_reason,
                    usage={
                        "prompt_tokens": result.prompt_tokens + self.earlier["prompt_tokens"],
                        "completion_tokens": result.completion_tokens + self.earlier["completion_tokens"],
                        "cached_tokens": result.cached_tokens + self.earlier["cached_tokens"],
                    },
                    cost_usd=money_str(result.cost_usd + self.earlier_cost),
                ),
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
        await self._publish(ErrorEvent(code="upstream_error", message="the reply failed", message_id=self.message_id))
