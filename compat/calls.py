"""One `/v1` call in flight (`CompletionCall`): the upstream call, its relayed stream, and its
one booking however it ends; the registry of calls a shutdown or the liveness beat reads."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import OperationalError

from billing.metering import call_release_async, call_returned, holds_release_all
from billing.models import UsageRecord
from conversations import shutdown
from conversations.errors import ModerationBlocked
from llm import relay
from llm.gateway import UpstreamError
from llm.tokens import count_text
from observability import metrics
from streaming import outages
from tenants.ratelimits import ratelimit_headers

from . import v1_liveness
from .cached import MISS, completion_keep, stream_keep
from .completions import CompletionPlan, SentenceGate, completion_output_check, completion_settle
from .db import db_after
from .errors import Reply, error_event

logger = logging.getLogger(__name__)

# Settlements run as tasks of their own: a client that disconnects cancels the response, and
# the usage must still be written. Strong references, as the loop keeps only weak ones.
_settling: set[asyncio.Task[Any]] = set()
# The calls in progress, by the task serving each: a shutdown waits for them, then interrupts.
_calls: dict[asyncio.Task[Any], CompletionCall] = {}


@contextlib.asynccontextmanager
async def call_in_flight(call: CompletionCall) -> AsyncIterator[CompletionCall]:
    """The call is in flight for as long as the block runs (served by the current task); on the
    way out its hold goes back (what was booked stays booked), then it leaves the registry."""
    task = asyncio.current_task()
    assert task is not None
    _calls[task] = call
    try:
        with metrics.generation_running("v1"):
            yield call
    finally:
        try:
            await call.release()
        finally:
            _calls.pop(task, None)


def calls_running() -> set[asyncio.Task[Any]]:
    return set(_calls)


def calls_in_flight() -> list[CompletionCall]:
    return list(_calls.values())


def calls_interrupt() -> None:
    """Shutdown: a stream ends at its next chunk (billed for what streamed, then OpenAI's
    in-stream error); a call not streaming yet is cancelled (its hold goes back)."""
    for task, call in list(_calls.items()):
        call.cut("this server is shutting down; the answer was cut")
        if call.stream is None:
            task.cancel()


async def settlements_finished() -> None:
    """Wait for every UsageRecord and settlement already under way (shutdown, tests); while
    PostgreSQL is away, for DEPENDENCY_RETRY_SECONDS at most (what is left is lost with the
    process, as undelivered events are)."""
    if _settling:
        await asyncio.wait(set(_settling), timeout=settings.DEPENDENCY_RETRY_SECONDS)


async def leases_release() -> None:
    """Shutdown, after every call settled: give this process's cap leases back."""
    await holds_release_all(hop=db_after)


shutdown.drainable_register(
    shutdown.Drainable(running=calls_running, interrupt=calls_interrupt, settled=settlements_finished)
)
shutdown.drained_register(leases_release)
# db_after looked up at each beat (a test may replace it)
v1_liveness.endpoint_register(calls=calls_in_flight, hop=lambda fn, /, **kwargs: db_after(fn, **kwargs))


class CompletionCall:
    """One call upstream and its one UsageRecord, however the call ends."""

    def __init__(self, plan: CompletionPlan, started: float) -> None:
        self.plan = plan
        self.started = started
        self.first_byte_at: float | None = None
        self.settled = False
        self.stream: relay.StreamRelay | None = None
        self.interrupted: str | None = None  # why the stream ends at its next chunk (shutdown…)
        # What the liveness beat has counted of the stream (on its database thread).
        self._counted_events = 0
        self._counted_text: list[str] = []
        self._counted_tokens = 0

    def cut(self, reason: str) -> None:
        self.interrupted = reason

    def checkpoint(self) -> dict[str, Any]:
        """What billing this call needs should the process die now (v1_liveness, on a database
        thread): the provider's usage when it arrived, else tiktoken's count of what was
        relayed so far — counted from the events new since the last beat."""
        plan, stream = self.plan, self.stream
        usage = stream.usage if stream is not None else None
        if usage is None and stream is not None:
            events = stream.events[self._counted_events:]  # only appended to, on the loop
            self._counted_events += len(events)
            text = [_event_text(event) for event in events]
            if any(text):
                self._counted_text += text
                self._counted_tokens = count_text("".join(self._counted_text), plan.model)
        price = plan.price
        return {
            "call_id": plan.call_id, "tenant_id": plan.tenant_id, "api_key_id": plan.api_key_id,
            "end_user_id": str(plan.end_user_id), "model": plan.model,
            "price": [str(price.input), str(price.cached_input), str(price.output)],
            "prompt_tokens": usage.prompt_tokens if usage else plan.prompt_tokens,
            "completion_tokens": usage.completion_tokens if usage else self._counted_tokens,
            "cached_tokens": usage.cached_tokens if usage else 0, "usage": usage is not None,
            "reservation_id": str(plan.hold.reservation_id) if plan.hold.reservation_id else None,
            "leases": [[str(lease.reservation_id), lease.period_id] for lease in plan.hold.draw.leases]
            if plan.hold.draw else [],
        }

    async def settle(self, *, usage: Any, content: str, outcome: str, error: BaseException | None = None) -> None:
        if self.settled:
            return
        self.settled = True
        now = time.monotonic()
        settle = functools.partial(
            db_after,
            completion_settle,
            plan=self.plan,
            usage=usage,
            content=content,
            outcome=outcome,
            error=error,
            latency_ms=int((now - self.started) * 1000),
            ttft_ms=int((self.first_byte_at - self.started) * 1000) if self.first_byte_at else None,
        )
        # A PostgreSQL restart delays the UsageRecord (and [DONE]); it does not lose it. The
        # caller waits for DEPENDENCY_RETRY_SECONDS at most (then a 503); the booking goes on
        # in the background for EVENT_LOG_DELIVERY_SECONDS: the provider was paid either way.
        task = asyncio.ensure_future(outages.outlast(
            settle, what="settling a /v1 call", seconds=settings.EVENT_LOG_DELIVERY_SECONDS))
        _settling.add(task)
        task.add_done_callback(_settling.discard)
        task.add_done_callback(_unbooked_logged)
        if self.plan.hold.draw is not None:  # return the unspent worst case to the leases, however it ends
            hold = self.plan.hold
            task.add_done_callback(lambda done: call_returned(hold, actual=_cost_of(done), hop=db_after))
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=settings.DEPENDENCY_RETRY_SECONDS)
        except TimeoutError:
            raise OperationalError("the call's usage could not be booked yet; it will be") from None

    async def complete(self) -> Reply:
        try:
            completion = await relay.complete(self.plan.target, self.plan.upstream_body)
        except BaseException as error:  # an upstream failure, or the client left: the call counts
            await self.settle(usage=None, error=error, content="", outcome=_failed(error))
            raise
        self.first_byte_at = time.monotonic()
        await self.settle(usage=completion.usage, content=completion.content, outcome=UsageRecord.Outcome.OK)
        blocked = await completion_output_check(self.plan, completion.content)
        if blocked is not None:  # generated and billed, but not for the caller's eyes
            raise blocked
        await completion_keep(self.plan, body=completion.body)
        return Reply(200, completion.body, content_type=completion.content_type.encode(), headers=self.headers())

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The `x-ratelimit-*` headers OpenAI sends, from the limits this call was counted against."""
        limits = tuple((name.encode(), value.encode()) for name, value in ratelimit_headers(self.plan.limits))
        return (*limits, MISS) if self.plan.cache_opted else limits

    async def open(self) -> relay.StreamRelay:
        try:
            self.stream = await relay.open_stream(
                self.plan.target, self.plan.upstream_body, forward_usage=self.plan.forward_usage
            )
        except BaseException as error:
            await self.settle(usage=None, error=error, content="", outcome=_failed(error))
            raise
        return self.stream

    async def release(self) -> None:
        """However the request ended — an exception anywhere, a client gone — give back what
        the call still holds: billed for what streamed when a stream was open, otherwise the
        hold returns untouched (the provider was never called; nothing is recorded)."""
        if self.settled:
            return
        if self.stream is not None:
            try:
                await self.stream.aclose()
            finally:
                await self.settle(usage=self.stream.usage, content=self._content(self.stream),
                                  outcome=UsageRecord.Outcome.CANCELLED)
            return
        self.settled = True
        await asyncio.shield(call_release_async(self.plan.hold, hop=db_after))

    async def relay_stream(self, stream: relay.StreamRelay) -> AsyncIterator[bytes]:
        outcome = UsageRecord.Outcome.CANCELLED  # unless the stream ends, the client left
        gate = SentenceGate(self.plan) if self.plan.sentence_checked else None
        try:
            try:
                async for chunk in stream.chunks():
                    if self.first_byte_at is None:
                        self.first_byte_at = time.monotonic()
                    if gate is not None:
                        chunk = await gate.feed(chunk)
                        if gate.blocked is not None:
                            break  # stop generating: what was made is billed, nothing more is sent
                    if chunk:
                        yield chunk
                    if self.interrupted:
                        raise UpstreamError(self.interrupted, code="service_unavailable")
            except UpstreamError as error:
                outcome = UsageRecord.Outcome.ERROR
                failure: UpstreamError | None = error
            else:
                outcome = UsageRecord.Outcome.OK if stream.done else UsageRecord.Outcome.ERROR
                failure = None if stream.done else UpstreamError("the model provider ended the stream early")
                if gate is not None and gate.blocked is not None:
                    outcome, failure = UsageRecord.Outcome.CANCELLED, None
            await stream.aclose()
            await self.settle(usage=stream.usage, content=self._content(stream), outcome=outcome)
            rest, blocked = await self._output_verdict(stream, gate) if failure is None else (b"", None)
            if rest:
                yield rest
            # OpenAI's own mid-stream failure shape: the SDK raises APIError on it.
            if blocked is not None:
                yield error_event(blocked.message, blocked.code)
            elif failure is not None:
                yield error_event(failure.message, failure.code)
            else:
                await stream_keep(self.plan, events=stream.events, usage=stream.usage)
                yield relay.DONE_EVENT + b"\n\n"
        finally:
            if not self.settled:  # the client disconnected: stop the upstream, bill what it made
                await stream.aclose()
                await self.settle(usage=stream.usage, content=self._content(stream), outcome=outcome)

    async def _output_verdict(
        self, stream: relay.StreamRelay, gate: SentenceGate | None
    ) -> tuple[bytes, ModerationBlocked | None]:
        """The output policy's last word on a finished stream: what the gate still holds and may
        now go out, and the block, if any. Only a policy that checks output parses the events."""
        if gate is not None:
            rest = await gate.finish() if gate.blocked is None else b""
            return rest, gate.blocked
        if not self.plan.output_checked:
            return b"", None
        return b"", await completion_output_check(self.plan, stream.streamed_content())

    @staticmethod
    def _content(stream: relay.StreamRelay) -> str:
        return "" if stream.usage is not None else stream.streamed_content()


def _event_text(event: bytes) -> str:
    """The text one relayed event carries (content and tool-call arguments), as billed."""
    parts: list[str] = []
    for delta in relay.event_deltas(event):
        parts.append(str(delta.get("content") or ""))
        for call in delta.get("tool_calls") or ():
            parts.append(str((call.get("function") or {}).get("arguments") or ""))
    return "".join(parts)


def _unbooked_logged(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("a /v1 call's usage was not booked: PostgreSQL stayed away past EVENT_LOG_DELIVERY_SECONDS",
                     exc_info=task.exception())


def _cost_of(task: asyncio.Future[Any]) -> Decimal | None:
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result().cost_usd


def _failed(error: BaseException) -> str:
    cancelled = isinstance(error, asyncio.CancelledError)
    return UsageRecord.Outcome.CANCELLED if cancelled else UsageRecord.Outcome.ERROR
