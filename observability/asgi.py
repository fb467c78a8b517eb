"""The outermost ASGI layer: every HTTP request and WebSocket gets a request id (a sane incoming
`X-Request-ID`, else a new one) as its log context, returned in the `X-Request-ID` response
header; and what each surface answers is counted — status codes, and the error codes of error
bodies, socket `error` frames and in-stream error events (read only from answers that can hold
one: an error status's small JSON body, a frame or chunk containing the error marker)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from asgiref.sync import sync_to_async

from . import context, metrics

logger = logging.getLogger("parley.access")

Message = MutableMapping[str, Any]
App = Callable[[Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

HEADER = b"x-request-id"
ERROR_BODY_LIMIT = 16_384
# json.dumps's separators: inside a JSON string the quotes would be escaped, so these markers
# only match a frame's own keys.
WS_ERROR = '"type": "error"'
SSE_ERROR = b'"type": "error"'
V1_STREAM_ERROR = b'data: {"error"'


def surface_of(path: str) -> str:
    for prefix, surface in (("/v1/", "v1"), ("/api/", "rest"), ("/admin/", "admin"), ("/ws/", "ws")):
        if path.startswith(prefix):
            return surface
    return "other"  # the chat page, /healthz, /metrics, static files


def _header(scope: Message, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


async def _error_seen(surface: str, code: Any) -> None:
    code = str(code)
    tenant = metrics.OTHER
    if code in metrics.REFUSALS:
        current = context.context_current()
        tenant_id = current.tenant_id if current is not None else None
        tenant = metrics.tenant_label_cached(tenant_id)
        if tenant is None:
            tenant = await sync_to_async(metrics.tenant_label, thread_sensitive=False)(tenant_id)
    metrics.error_answered(surface, code, tenant=tenant)


def _codes_in_events(chunk: bytes) -> list[Any]:
    """The error codes of the SSE events in a chunk (`data: {...}` lines)."""
    codes = []
    for line in chunk.split(b"\n"):
        if line.startswith(b"data: {") and (SSE_ERROR in line or line.startswith(V1_STREAM_ERROR)):
            try:
                event = json.loads(line[6:])
            except ValueError:
                continue
            error = event.get("error")
            codes.append(error.get("code") if isinstance(error, dict) else event.get("code"))
    return codes


class ObservedApp:
    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        request_id = context.request_id_sane(_header(scope, HEADER)) or context.request_id_new()
        token = context.context_start(request_id)
        own = context.context_current()  # a socket's frames start contexts of their own
        answer = _Answer(surface_of(scope["path"]), request_id.encode())
        started = time.monotonic()
        try:
            if scope["type"] == "websocket":
                await self.app(scope, receive, answer.sender_ws(send))
            else:
                await self.app(scope, receive, answer.sender_http(send))
        finally:
            if answer.socket_open:
                metrics.socket_closed()
            context.context_end(token)
            token = context.context_use(own)
            # The access line (no query string: it may hold a socket's token).
            logger.info("%s %s %s %s %d ms", scope["type"], scope.get("method", "-"), scope["path"],
                        answer.status or "-", (time.monotonic() - started) * 1000)
            context.context_end(token)


class _Answer:
    """What one request or socket answers, watched on its way out."""

    def __init__(self, surface: str, request_id: bytes) -> None:
        self.surface, self.request_id = surface, request_id
        self.socket_open = False
        self.error_body: list[bytes] | None = None  # collecting an error status's JSON body
        self.streaming = False  # an event stream: errors come as events
        self.status: int | None = None

    def sender_http(self, send: Callable[[Message], Awaitable[None]]) -> Callable[[Message], Awaitable[None]]:
        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = self._started(message)
            elif message["type"] == "http.response.body":
                await self._body(message.get("body", b""), more=message.get("more_body", False))
            await send(message)

        return observed

    def _started(self, message: Message) -> Message:
        headers = list(message.get("headers", ()))
        content_type = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        if content_type.startswith(b"text/event-stream"):
            self.streaming = True
            if self.surface == "rest":
                self.surface = "sse"
        status = self.status = message["status"]
        metrics.request_answered(self.surface, status)
        if status >= 400 and content_type.startswith(b"application/json"):
            self.error_body = []
        if not any(k.lower() == HEADER for k, _ in headers):
            headers.append((HEADER, self.request_id))
        return {**message, "headers": headers}

    async def _body(self, chunk: bytes, *, more: bool) -> None:
        if self.streaming:
            for code in _codes_in_events(chunk):
                await _error_seen(self.surface, code)
        elif self.error_body is not None:
            self.error_body.append(chunk)
            body = b"".join(self.error_body)
            if more and len(body) < ERROR_BODY_LIMIT:
                return
            self.error_body = None
            try:
                error = json.loads(body).get("error")
            except (ValueError, AttributeError):
                error = None
            await _error_seen(self.surface, error.get("code") if isinstance(error, dict) else None)

    def sender_ws(self, send: Callable[[Message], Awaitable[None]]) -> Callable[[Message], Awaitable[None]]:
        async def observed(message: Message) -> None:
            kind = message["type"]
            if kind == "websocket.send":
                text = message.get("text")
                if text and WS_ERROR in text:
                    frame = json.loads(text)
                    if frame.get("type") == "error":
                        await _error_seen("ws", frame.get("code"))
            elif kind == "websocket.accept":
                message = {**message, "headers": [*message.get("headers", ()), (HEADER, self.request_id)]}
                metrics.request_answered("ws", 101)
                self.socket_open, self.status = True, 101
                metrics.socket_opened()
            elif kind == "websocket.close" and not self.socket_open:
                metrics.request_answered("ws", 403)  # refused at the handshake
                self.status = 403
            await send(message)

        return observed
