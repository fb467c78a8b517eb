"""OpenAI's error body for `/v1`: the one mapper from Parley's errors to `{"error": {…}}`, so the
official SDK raises its own classes (AuthenticationError, RateLimitError, …)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from conversations.errors import ShuttingDown
from conversations.protocol import DOMAIN_ERRORS, error_event_for
from llm import relay
from llm.gateway import UpstreamError
from observability.context import request_id_current
from streaming import outages
from tenants.services import InvalidApiKey

from .completions import EndUserBlocked, ModelNotAvailable

Send = Any  # the ASGI send callable


class BodyTooLarge(Exception):
    """A request body over DATA_UPLOAD_MAX_MEMORY_SIZE."""


class MethodNotAllowed(Exception):
    def __init__(self, allow: str) -> None:
        super().__init__(allow)
        self.allow = allow


class ClientGone(Exception):
    """The client disconnected before we answered."""


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
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code, **_request_id()}}
    return Reply.json(body, status=status, headers=tuple(headers))


def _request_id() -> dict[str, str]:
    request_id = request_id_current()
    return {"request_id": request_id} if request_id else {}


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


def error_event(message: str, code: str | None) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code, **_request_id()}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"



def in_stream(reply: Reply) -> bytes:
    """A failure after the status line went out: OpenAI's in-stream error event, then [DONE]."""
    error = json.loads(reply.body)["error"]
    return error_event(error["message"], error["code"]) + relay.DONE_EVENT + b"\n\n"
