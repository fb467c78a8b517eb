"""The OpenAI-compatible surface: `POST /v1/chat/completions`, `GET /v1/models[/{id}]`.

A small ASGI app mounted in front of Django (see `OpenAICompatibleApp`): the official SDK
pointed at `http://HOST/v1` works unchanged. The hot path is `completion_admit` on the event
loop (cached configuration, one Redis round trip, one database hop only for an exact hold
when a cap applies and no lease covers the call), the upstream call, the upstream's bytes relayed as they arrive
(`llm.relay`), and one hop after the stream to write the UsageRecord — before `[DONE]`, so a
client that read to the end finds the call billed. No database connection is held while
streaming.
Errors use OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, mapped in one
place (`compat.errors.openai_error`), so the SDK raises its own classes (AuthenticationError, …).
The parts: request parsing (`requests`), admission and booking (`completions`, through
billing.metering), one call in flight (`calls`), the error mapper (`errors`), the database
threads (`db`), and the liveness of the process's holds (`v1_liveness`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings

from conversations import shutdown

from .cached import cached_reply
from .calls import CompletionCall, call_in_flight
from .completions import ModelNotAvailable, completion_admit, models_available
from .db import db
from .errors import (
    MAPPED_ERRORS,
    BodyTooLarge,
    ClientGone,
    MethodNotAllowed,
    Reply,
    error_reply,
    in_stream,
    openai_error,
)
from .requests import completion_request_parse

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def chat_completions(request: Request) -> Reply | None:
    started = time.monotonic()
    shutdown.turn_admit()
    body = completion_request_parse(await request.body())
    plan = await completion_admit(
        authorization=request.authorization, request=body, hop=db, cache_asked=request.cache_asked
    )
    async with call_in_flight(CompletionCall(plan, started)) as call:
        # A hit answers from the response cache; leaving the block gives the unused hold back.
        return await cached_reply(plan, headers=call.headers) or await _answer(request, call)


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
        self.cache_asked = False  # `X-Parley-Cache: on`: cache this request whatever its temperature
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                self.authorization = value.decode("latin-1")
            elif name == b"x-parley-cache":
                self.cache_asked = value.strip().lower() == b"on"

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


# The Batch API's paths are Django views (batches/v1.py): uploads need Django's multipart parser,
# and none of them is a hot path.
DJANGO_PATHS = ("/v1/files", "/v1/batches")


def _is_django(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in DJANGO_PATHS)


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
        if scope["type"] != "http" or not scope["path"].startswith("/v1/") or _is_django(scope["path"]):
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
            await request.send({"type": "http.response.body", "body": in_stream(reply)})
            return
    if reply is not None:
        await reply.send(request.send)


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
