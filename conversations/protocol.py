"""The chat wire protocol: client commands parsed strictly, server events as typed objects.

Shared by the WebSocket consumer and the REST event stream, so both speak the same events.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from django.conf import settings

from billing.caps import CapExceeded
from billing.services import PriceMissing, money_str
from llm.gateway import UpstreamError
from observability.context import request_id_current
from streaming.eventlog import OFFSET_PATTERN
from streaming.outages import UNAVAILABLE, UNAVAILABLE_MESSAGE, retry_after
from tenants.ratelimits import RateLimited

from .errors import ChatError

ERROR_CODES = frozenset(
    {
        "invalid_request",
        "unauthorized",
        "not_found",
        "rate_limited",
        "spending_cap_exceeded",
        "moderation_blocked",
        "upstream_error",
        "upstream_timeout",
        "cancelled",
    }
)


class InvalidFrame(ValueError):
    """A client frame that does not follow the protocol; the message says what is wrong."""


# --- client JSON: the one decoder of every surface (REST bodies, /v1 bodies, socket frames) --

MAX_JSON_DEPTH = 64  # generous for tool schemas; Python's own decoder gives up near 1,000
_UNSAFE_TEXT = re.compile("[\x00\ud800-\udfff]")


def text_check(value: str, name: str) -> str:
    """Text no surface can keep: NUL (PostgreSQL refuses it in text) and lone surrogates
    (they cannot be encoded as UTF-8, so they fail wherever the text is written or sent).
    Raises InvalidFrame naming the field, never quoting the text."""
    if _unsafe(value):
        found = _UNSAFE_TEXT.search(value)
        assert found is not None
        what = "NUL characters" if found.group() == "\x00" else "unpaired surrogates (\\ud800-\\udfff)"
        raise InvalidFrame(f"{name} must not contain {what}")
    return value


def _unsafe(value: str) -> bool:
    # ASCII text (most of it) is one memchr; only other text pays for the regular expression.
    return "\x00" in value or (not value.isascii() and _UNSAFE_TEXT.search(value) is not None)


def json_parse(data: str | bytes) -> Any:
    """Client JSON, decoded so that nothing in it can break what comes after: nesting at most
    MAX_JSON_DEPTH deep (deeper input made the decoder raise RecursionError: a 500, or a socket
    closed with 1011), finite numbers only (no NaN, Infinity or 1e400), and no string or key
    that `text_check` refuses. Raises InvalidFrame."""
    try:
        value = json.loads(data, parse_constant=_not_a_number, parse_float=_finite)
    except InvalidFrame:
        raise
    except RecursionError:
        raise InvalidFrame(_TOO_DEEP) from None
    except ValueError:  # UnicodeDecodeError included
        raise InvalidFrame("not valid JSON") from None
    if isinstance(value, str):
        text_check(value, "the JSON")
    elif isinstance(value, (dict, list)):
        _json_check(value)
    return value


_TOO_DEEP = f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels"


def _not_a_number(constant: str) -> float:
    raise InvalidFrame(f"{constant} is not a JSON number")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise InvalidFrame(f"the number {literal[:20]} is out of range")
    return value


def _json_check(container: dict[str, Any] | list[Any]) -> None:
    """Depth and text, walked without recursion (the input is what may be deep); only
    containers are queued. A path is a linked tuple (parent, key), spelled out only for the
    error message."""
    pending: list[tuple[Any, int, tuple[Any, Any] | None]] = [(container, 1, None)]
    while pending:
        node, depth, path = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidFrame(_TOO_DEEP)
        for key, child in node.items() if isinstance(node, dict) else enumerate(node):
            if isinstance(key, str) and _unsafe(key):
                text_check(key, f"a key of {_path_name(path)}")
            if isinstance(child, str):
                if _unsafe(child):
                    text_check(child, _path_name((path, key)))
            elif isinstance(child, (dict, list)):
                pending.append((child, depth + 1, (path, key)))


def _path_name(path: tuple[Any, Any] | None) -> str:
    keys: list[Any] = []
    while path is not None:
        path, key = path
        keys.append(key)
    name = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in reversed(keys)).lstrip(".")
    return name[:100] or "the JSON"


# --- client → server ----------------------------------------------------------------------


@dataclass(frozen=True)
class MessageCreate:
    content: str
    conversation_id: uuid.UUID | None = None
    assistant: str | None = None
    client_msg_id: str | None = None


@dataclass(frozen=True)
class GenerationCancel:
    conversation_id: uuid.UUID


@dataclass(frozen=True)
class ConversationJoin:
    conversation_id: uuid.UUID
    after: str | None = None  # the last event offset the client saw: replay what followed


ClientCommand = MessageCreate | GenerationCancel | ConversationJoin

_ALLOWED_KEYS = {
    "message.create": {"type", "conversation_id", "assistant", "content", "client_msg_id"},
    "generation.cancel": {"type", "conversation_id"},
    "conversation.join": {"type", "conversation_id", "after"},
}


CLIENT_MSG_ID_MAX = 100
# A client_msg_id in a frame that could not be parsed (not JSON, too large to parse): found
# without parsing the rest, so the error still reaches the message the client is waiting on.
_CLIENT_MSG_ID_TEXT = re.compile(rf'"client_msg_id"\s*:\s*("(?:[^"\\]|\\.){{1,{CLIENT_MSG_ID_MAX}}}")')


def frame_client_msg_id(frame: Any) -> str | None:
    """The frame's client_msg_id when it has a usable one, however wrong the rest is."""
    value = frame.get("client_msg_id") if isinstance(frame, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= CLIENT_MSG_ID_MAX else None


def text_client_msg_id(text: str) -> str | None:
    """The client_msg_id of a frame's raw text, best effort, for frames that do not parse."""
    found = _CLIENT_MSG_ID_TEXT.search(text)
    if found is None:
        return None
    try:
        return frame_client_msg_id({"client_msg_id": json.loads(found.group(1))})
    except ValueError:
        return None


def _uuid(value: Any, *, required: bool) -> uuid.UUID | None:
    if value is None:
        if required:
            raise InvalidFrame("conversation_id is required")
        return None
    if not isinstance(value, str):
        raise InvalidFrame("conversation_id must be a UUID string")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidFrame("conversation_id must be a UUID string") from None


def _optional_str(frame: dict[str, Any], key: str, max_length: int) -> str | None:
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise InvalidFrame(f"{key} must be a non-empty string of at most {max_length} characters")
    return value


def validate_content(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidFrame("content must be a string")
    if not value.strip():
        raise InvalidFrame("content must not be empty")
    if len(value) > settings.MAX_MESSAGE_CHARS:
        raise InvalidFrame(f"content is longer than {settings.MAX_MESSAGE_CHARS} characters")
    return text_check(value, "content")


def parse_client_frame(frame: Any) -> ClientCommand:
    if not isinstance(frame, dict):
        raise InvalidFrame("a frame must be a JSON object")
    kind = frame.get("type")
    if not isinstance(kind, str) or kind not in _ALLOWED_KEYS:
        raise InvalidFrame(f"unknown type {kind!r}; expected one of {sorted(_ALLOWED_KEYS)}")
    unknown = set(frame) - _ALLOWED_KEYS[kind]
    if unknown:
        raise InvalidFrame(f"unknown field(s) for {kind}: {', '.join(sorted(unknown))}")
    if kind == "message.create":
        return MessageCreate(
            content=validate_content(frame.get("content")),
            conversation_id=_uuid(frame.get("conversation_id"), required=False),
            assistant=_optional_str(frame, "assistant", 64),
            client_msg_id=_optional_str(frame, "client_msg_id", CLIENT_MSG_ID_MAX),
        )
    conversation_id = _uuid(frame.get("conversation_id"), required=True)
    assert conversation_id is not None
    if kind == "generation.cancel":
        return GenerationCancel(conversation_id=conversation_id)
    return ConversationJoin(conversation_id=conversation_id, after=_offset(frame.get("after")))


def _offset(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not OFFSET_PATTERN.match(value):
        raise InvalidFrame("after must be an event offset as sent in an event's offset field")
    return value


# --- server → client ----------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    type: ClassVar[str]
    # Fields whose None means "absent" rather than null on the wire.
    optional: ClassVar[frozenset[str]] = frozenset()

    def as_dict(self) -> dict[str, Any]:
        # The instance's own fields, shallow (none nests a dataclass): `asdict`'s deep copy
        # cost more than the rest of a delta's publish.
        body = {k: v for k, v in vars(self).items() if not (k in self.optional and v is None)}
        return {"type": self.type, **body}


def _s(value: uuid.UUID | str) -> str:
    return str(value)


@dataclass(frozen=True)
class ConversationCreated(Event):
    type: ClassVar[str] = "conversation"
    id: str


@dataclass(frozen=True)
class MessageAccepted(Event):
    type: ClassVar[str] = "message.accepted"
    optional: ClassVar[frozenset[str]] = frozenset({"client_msg_id"})
    message_id: str
    client_msg_id: str | None = None


@dataclass(frozen=True)
class MessageStarted(Event):
    type: ClassVar[str] = "message.started"
    message_id: str
    model: str


@dataclass(frozen=True)
class Delta(Event):
    type: ClassVar[str] = "delta"
    message_id: str
    content: str


@dataclass(frozen=True)
class ToolCall(Event):
    type: ClassVar[str] = "tool.call"
    message_id: str
    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolResult(Event):
    type: ClassVar[str] = "tool.result"
    call_id: str
    ok: bool


@dataclass(frozen=True)
class MessageCompleted(Event):
    type: ClassVar[str] = "message.completed"
    optional: ClassVar[frozenset[str]] = frozenset({"cached"})
    message_id: str
    finish_reason: str
    usage: dict[str, int]
    cost_usd: str
    cached: bool | None = None  # True: the response cache answered (no model call)


@dataclass(frozen=True)
class ConversationState(Event):
    type: ClassVar[str] = "conversation.state"
    optional: ClassVar[frozenset[str]] = frozenset({"message_id", "content"})
    conversation_id: str
    generating: bool
    message_id: str | None = None
    content: str | None = None


@dataclass(frozen=True)
class ErrorEvent(Event):
    type: ClassVar[str] = "error"
    optional: ClassVar[frozenset[str]] = frozenset({"retry_after", "message_id"})
    code: str
    message: str
    retry_after: float | None = None
    message_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.code not in ERROR_CODES:
            raise ValueError(f"unknown error code {self.code!r}")

    def as_dict(self) -> dict[str, Any]:
        body = super().as_dict()
        extra = body.pop("extra")
        request_id = request_id_current()  # the request, frame or generation that failed
        return {**extra, **body, **({"request_id": request_id} if request_id else {})}

    @classmethod
    def invalid_request(cls, message: str, *, client_msg_id: str | None = None) -> ErrorEvent:
        return cls(code="invalid_request", message=message, extra=echo(client_msg_id))


def echo(client_msg_id: str | None) -> dict[str, Any]:
    """The fields an error answering a client frame carries back: its client_msg_id, if any."""
    return {"client_msg_id": client_msg_id} if client_msg_id else {}


# --- domain errors → error events: the one mapping ----------------------------------------

# The last ones: PostgreSQL or Redis away for a moment (a 503 on HTTP, an error frame on a socket).
DOMAIN_ERRORS = (ChatError, InvalidFrame, PriceMissing, UpstreamError, CapExceeded, RateLimited, *UNAVAILABLE)


def error_event_for(error: Exception, *, message_id: str | None = None, **extra: Any) -> ErrorEvent:
    """The one mapping from domain errors to the contract's error events; each surface turns
    the event into its own wire shape (socket frame, REST body, OpenAI error body)."""
    if isinstance(error, CapExceeded):
        cap = {
            "scope": error.scope,
            "period": error.period,
            "limit_usd": money_str(error.limit),
            "remaining_usd": money_str(error.remaining),
            "resets_at": error.resets_at.isoformat().replace("+00:00", "Z") if error.resets_at else None,
        }
        return ErrorEvent(
            code="spending_cap_exceeded", message=str(error), retry_after=error.retry_after, message_id=message_id,
            extra={**extra, "cap": cap},
        )
    if isinstance(error, RateLimited):
        return ErrorEvent(code="rate_limited", message=str(error), retry_after=error.retry_after, message_id=message_id, extra=extra)
    if isinstance(error, ChatError):
        return ErrorEvent(code=error.code, message=error.message, retry_after=error.retry_after, message_id=message_id, extra=extra)
    if isinstance(error, InvalidFrame):
        return ErrorEvent(code="invalid_request", message=str(error), message_id=message_id, extra=extra)
    if isinstance(error, PriceMissing):
        return ErrorEvent(code="invalid_request", message=str(error), message_id=message_id, extra=extra)
    if isinstance(error, UpstreamError):
        return ErrorEvent(code=error.code, message=error.message, retry_after=error.retry_after, message_id=message_id, extra=extra)
    if isinstance(error, UNAVAILABLE):
        # The contract has no code of its own for this; the closest: a failure behind Parley.
        return ErrorEvent(
            code="upstream_error", message=UNAVAILABLE_MESSAGE, retry_after=retry_after(), message_id=message_id,
            extra=extra,
        )
    raise error
