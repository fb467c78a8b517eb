"""The OpenAI-compatible surface: `POST /v1/chat/completions`, `GET /v1/models[/{id}]`.

A small ASGI app mounted in front of Django (see `OpenAICompatibleApp`): the official SDK
pointed at `http://HOST/v1` works unchanged. The hot path is `completion_admit` on the event
loop (cached configuration, one Redis round trip, one database hop only for the reservation
when a cap applies), the upstream call, the upstream's bytes relayed as they arrive
(`llm.relay`), and one hop after the stream to write the UsageRecord — before `[DONE]`, so a
client that read to the end finds the call billed. No database connection is held while
streaming.
Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, mapped in one
place (`openai_error`), so the SDK raises its own classes (AuthenticationError, …).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection

from billing.leases import leases
from billing.models import UsageRecord
from billing.services import usage_billed
from conversations import shutdown
from conversations.errors import ModerationBlocked, ShuttingDown
from conversations.protocol import DOMAIN_ERRORS, error_event_for
from llm import relay
from llm.gateway import UpstreamError
from llm.tokens import count_text
from streaming import outages
from tenants.ratelimits import ratelimit_headers
from tenants.services import InvalidApiKey

from . import v1_liveness
from .completions import (
    CompletionPlan,
    EndUserBlocked,
    ModelNotAvailable,
    SentenceGate,
    completion_admit,
    completion_output_check,
    completion_request_parse,
    completion_settle,
    hold_release,
    models_available,
)

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class BodyTooLarge(Exception):
    """A request body over DATA_UPLOAD_MAX_MEMORY_SIZE."""


class MethodNotAllowed(Exception):
    def __init__(self, allow: str) -> None:
        super().__init__(allow)
        self.allow = allow


class ClientGone(Exception):
    """The client disconnected before we answered."""


# --- errors: the one OpenAI-error-body mapper ---------------------------------------------

# contract code → (HTTP status, OpenAI error type)
_STATUS_AND_TYPE = {
    "invalid_request": (400, "invalid_request_error"),
    "unauthorized": (401, "invalid_request_error"),
    "not_found": (404, "invalid_request_error"),
    "moderation_blocked": (400, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "spending_cap_exceeded": (429, "insufficient_quota"),
    "upstream_error": (502, "server_error"),
    "upstream_timeout": (504, "server_error"),
    "cancelled": (499, "server_error"),
}
MAPPED_ERRORS = (InvalidApiKey, BodyTooLarge, MethodNotAllowed, *DOMAIN_ERRORS)


@dataclass(frozen=True)
class Reply:
    """A whole (non-streamed) answer."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def json(cls, payload: Any, status: int = 200, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
        return cls(status, json.dumps(payload).encode(), headers=headers)

    async def send(self, send: Send) -> None:
        headers = [(b"content-type", self.content_type), (b"content-length", str(len(self.body)).encode()), *self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def error_reply(
    status: int, message: str, *, error_type: str, code: str | None, param: str | None = None,
    retry_after: float | None = None, should_retry: bool | None = None, allow: str | None = None,
) -> Reply:
    headers: list[tuple[bytes, bytes]] = []
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(retry_after))).encode()))
    if should_retry is not None:  # read by the official SDKs' retry logic
        headers.append((b"x-should-retry", b"true" if should_retry else b"false"))
    if allow is not None:
        headers.append((b"allow", allow.encode()))
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return Reply.json(body, status=status, headers=tuple(headers))


def openai_error(error: Exception) -> Reply:
    if isinstance(error, ShuttingDown):  # the SDKs retry a 503 after Retry-After: another process answers
        return error_reply(503, error.message, error_type="server_error", code="service_unavailable",
                           retry_after=error.retry_after)
    if isinstance(error, outages.UNAVAILABLE):  # PostgreSQL or Redis away for a moment
        return error_reply(
            503, outages.UNAVAILABLE_MESSAGE, error_type="server_error", code="service_unavailable",
            retry_after=outages.retry_after(),
        )
    if isinstance(error, InvalidApiKey):
        return error_reply(
            401, f"Incorrect API key provided ({error}).", error_type="invalid_request_error", code="invalid_api_key"
        )
    if isinstance(error, ModelNotAvailable):
        return error_reply(404, error.message, error_type="invalid_request_error", code="model_not_found", param="model")
    if isinstance(error, EndUserBlocked):
        return error_reply(403, error.message, error_type="permission_error", code="unauthorized", param="user")
    if isinstance(error, BodyTooLarge):
        return error_reply(413, "the request body is too large", error_type="invalid_request_error", code="invalid_request")
    if isinstance(error, MethodNotAllowed):
        return error_reply(
            405, "method not allowed", error_type="invalid_request_error", code="invalid_request", allow=error.allow
        )
    if isinstance(error, UpstreamError) and error.status in relay.CALLER_FAULT_STATUSES:
        # The provider refused the caller's own request (bad tool schema, context too long…).
        return error_reply(400, error.message, error_type="invalid_request_error", code="invalid_request")
    if isinstance(error, DOMAIN_ERRORS):
        event = error_event_for(error)
        status, error_type = _STATUS_AND_TYPE[event.code]
        return error_reply(
            status, event.message, error_type=error_type, code=event.code,
            param=getattr(error, "param", None), retry_after=event.retry_after,
            # A spent cap does not come back in the SDK's retry window.
            should_retry=False if event.code == "spending_cap_exceeded" else None,
        )
    raise error


# --- database work -----------------------------------------------------------------------

# The endpoint's database work runs on a few long-lived threads that keep their connections.
# Through Django's per-request path each call would run in a fresh thread (the request's
# ThreadSensitiveContext) and, with CONN_MAX_AGE=0, open a new connection: ~3 ms and a
# connection handshake's CPU before every first token. Here the connections are a bounded set
# (one per thread), not one per request or per open stream; none is held while streaming.
# Two pools: what a call waits on before its first token (configuration loads, the
# reservation) never queues behind the bookkeeping of finished streams.
DB_THREADS = 4
_before_executor = ThreadPoolExecutor(max_workers=DB_THREADS, thread_name_prefix="openai-db")
_after_executor = ThreadPoolExecutor(max_workers=DB_THREADS, thread_name_prefix="openai-settle")


def _in_db_thread(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    # These threads bypass Django's request signals, so nothing else checks their kept
    # connection: one that died with a PostgreSQL restart is replaced before any query is
    # sent (a SELECT 1, ~0.1 ms), instead of failing this call.
    if connection.connection is not None and not connection.is_usable():
        connection.close()
    try:
        return fn(**kwargs)
    finally:
        if connection.errors_occurred or connection.in_atomic_block:
            connection.close()  # broken or left mid-transaction: the next call reconnects


async def db(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Run a synchronous service on the endpoint's database threads (before the stream)."""
    return await asyncio.get_running_loop().run_in_executor(_before_executor, _in_db_thread, fn, kwargs)


async def db_after(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """`db` for the work after a stream (the UsageRecord and the settlement)."""
    return await asyncio.get_running_loop().run_in_executor(_after_executor, _in_db_thread, fn, kwargs)


# --- chat completions ---------------------------------------------------------------------

# Settlements run as tasks of their own: a client that disconnects cancels the response, and
# the usage must still be written. Strong references, as the loop keeps only weak ones.
_settling: set[asyncio.Task[Any]] = set()
# The calls in progress, by the task serving each: a shutdown waits for them, then interrupts.
_calls: dict[asyncio.Task[Any], CompletionCall] = {}


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
    """Wait for every UsageRecord and settlement already under way (shutdown, tests)."""
    if _settling:
        await asyncio.wait(set(_settling))


async def leases_release() -> None:
    """Shutdown, after every call settled: give this process's cap leases back."""
    await leases().release_all(db_after)


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
            "reservation_id": str(plan.reservation.pk) if plan.reservation is not None and plan.reservation.period_ids
            else None,
            "leases": [[str(lease.reservation_id), lease.period_id] for lease in plan.draw.leases] if plan.draw else [],
        }

    async def settle(self, *, usage: Any, content: str, outcome: str) -> None:
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
            latency_ms=int((now - self.started) * 1000),
            ttft_ms=int((self.first_byte_at - self.started) * 1000) if self.first_byte_at else None,
        )
        # A PostgreSQL restart delays the UsageRecord (and [DONE]); it does not lose it.
        task = asyncio.ensure_future(outages.outlast(settle, what="settling a /v1 call"))
        _settling.add(task)
        task.add_done_callback(_settling.discard)
        if self.plan.draw is not None:  # return the unspent worst case to the leases, however it ends
            draw = self.plan.draw
            task.add_done_callback(lambda done: leases().settled(draw, actual=_cost_of(done), hop=db_after))
        await asyncio.shield(task)

    async def complete(self) -> Reply:
        try:
            completion = await relay.complete(self.plan.target, self.plan.upstream_body)
        except BaseException as error:  # an upstream failure, or the client left: the call counts
            await self.settle(usage=usage_billed(usage=None, error=error, streamed=False), content="",
                              outcome=_failed(error))
            raise
        self.first_byte_at = time.monotonic()
        await self.settle(usage=completion.usage, content=completion.content, outcome=UsageRecord.Outcome.OK)
        blocked = await completion_output_check(self.plan, completion.content)
        if blocked is not None:  # generated and billed, but not for the caller's eyes
            raise blocked
        return Reply(200, completion.body, content_type=completion.content_type.encode(), headers=self.headers())

    def headers(self) -> tuple[tuple[bytes, bytes], ...]:
        """The `x-ratelimit-*` headers OpenAI sends, from the limits this call was counted against."""
        return tuple((name.encode(), value.encode()) for name, value in ratelimit_headers(self.plan.limits))

    async def open(self) -> relay.StreamRelay:
        try:
            self.stream = await relay.open_stream(
                self.plan.target, self.plan.upstream_body, forward_usage=self.plan.forward_usage
            )
        except BaseException as error:
            await self.settle(usage=usage_billed(usage=None, error=error, streamed=False), content="",
                              outcome=_failed(error))
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
        await asyncio.shield(hold_release(reservation=self.plan.reservation, draw=self.plan.draw, hop=db_after))

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
                yield _error_event(blocked.message, blocked.code)
            elif failure is not None:
                yield _error_event(failure.message, failure.code)
            else:
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


def _cost_of(task: asyncio.Future[Any]) -> Decimal | None:
    if task.cancelled() or task.exception() is not None:
        return None
    return task.result().cost_usd


def _failed(error: BaseException) -> str:
    cancelled = isinstance(error, asyncio.CancelledError)
    return UsageRecord.Outcome.CANCELLED if cancelled else UsageRecord.Outcome.ERROR


def _error_event(message: str, code: str | None) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def chat_completions(request: Request) -> Reply | None:
    started = time.monotonic()
    shutdown.turn_admit()
    body = completion_request_parse(await request.body())
    plan = await completion_admit(authorization=request.authorization, request=body, hop=db)
    call = CompletionCall(plan, started)
    task = asyncio.current_task()
    assert task is not None
    _calls[task] = call
    try:
        return await _answer(request, call)
    finally:
        try:
            await call.release()
        finally:
            _calls.pop(task, None)


async def _answer(request: Request, call: CompletionCall) -> Reply | None:
    if not call.plan.stream:
        return await call.complete()
    stream = await call.open()
    await request.send({"type": "http.response.start", "status": 200, "headers": [*SSE_HEADERS, *call.headers()]})
    # aclosing: when a disconnect cancels us mid-send, the relay's cleanup (closing the
    # upstream, billing what was generated) runs now, not whenever the generator is collected.
    async with contextlib.aclosing(call.relay_stream(stream)) as chunks:
        async for chunk in chunks:
            await request.send({"type": "http.response.body", "body": chunk, "more_body": True})
    await request.send({"type": "http.response.body", "body": b""})
    return None


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


# --- models -------------------------------------------------------------------------------


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "parley"}


async def models_list(request: Request) -> Reply:
    models = await db(models_available, authorization=request.authorization)
    return Reply.json({"object": "list", "data": [_model(m) for m in models]})


async def model_retrieve(request: Request, model_id: str) -> Reply:
    models = await db(models_available, authorization=request.authorization)
    if model_id not in models:
        raise ModelNotAvailable(model_id)
    return Reply.json(_model(model_id))


# --- the ASGI app -------------------------------------------------------------------------


class Request:
    """What the handlers need of an ASGI HTTP request, and its `send`."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope, self.receive, self._send = scope, receive, send
        self.started = False  # the response's status line has gone out
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.authorization = ""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                self.authorization = value.decode("latin-1")

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def body(self) -> bytes:
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > settings.DATA_UPLOAD_MAX_MEMORY_SIZE:
                raise BodyTooLarge()
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)


async def _route(request: Request) -> Reply | None:
    path, method = request.path, request.method
    if path == "/v1/chat/completions":
        if method != "POST":
            raise MethodNotAllowed("POST")
        return await chat_completions(request)
    if path == "/v1/models" or path.startswith("/v1/models/"):
        if method != "GET":
            raise MethodNotAllowed("GET")
        model_id = path[len("/v1/models/"):]
        return await (model_retrieve(request, model_id) if model_id else models_list(request))
    return error_reply(404, f"Invalid URL ({method} {path})", error_type="invalid_request_error", code=None)


class OpenAICompatibleApp:
    """Serves `/v1/…` itself and hands every other request to `app` (Django).

    A raw ASGI app rather than Django views: in async mode every MiddlewareMixin middleware
    costs two thread hops per request, and Django's handler starts a thread per request for
    its signals; measured here, that doubled the CPU of a proxied stream. Nothing of what
    the middleware stack does (sessions, CSRF, messages, frame options) applies to a bearer-
    authenticated JSON API. What this app does itself: read the body (size-limited like
    Django's), route three paths, map every error to OpenAI's body, and stop relaying —
    billing what was generated — when the client disconnects."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        await handle(Request(scope, receive, send))


async def handle(request: Request) -> None:
    try:
        reply = await _serve(request)
    except ClientGone:
        return
    except Exception as error:
        reply = _failure_reply(request, error)
        if request.started:  # mid-stream: end it the way OpenAI ends a failed stream, then [DONE]
            await request.send({"type": "http.response.body", "body": _in_stream(reply)})
            return
    if reply is not None:
        await reply.send(request.send)


def _in_stream(reply: Reply) -> bytes:
    error = json.loads(reply.body)["error"]
    return _error_event(error["message"], error["code"]) + relay.DONE_EVENT + b"\n\n"


def _failure_reply(request: Request, error: Exception) -> Reply:
    if isinstance(error, MAPPED_ERRORS):
        return openai_error(error)
    logger.exception("%s %s failed", request.method, request.path, exc_info=error)
    return error_reply(500, "internal error", error_type="server_error", code=None)


async def _serve(request: Request) -> Reply | None:
    """Run the route while watching for the client to disconnect; a disconnect cancels the
    route (a streaming relay then closes the upstream and bills what was generated)."""
    route = asyncio.ensure_future(_route(request))
    watcher: asyncio.Future[Any] | None = None
    try:
        while not route.done():
            watcher = watcher or asyncio.ensure_future(request.receive())
            await asyncio.wait([route, watcher], return_when=asyncio.FIRST_COMPLETED)
            if watcher.done() and watcher.result()["type"] == "http.disconnect" and not route.done():
                route.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await route
                raise ClientGone()
            if watcher.done():
                watcher = None
        return route.result()
    finally:
        if watcher is not None and not watcher.done():
            watcher.cancel()
