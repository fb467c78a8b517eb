"""The data of a tool call: what the model asked for, who asked, and what came back."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ToolCallRequest:
    """One whole call the model made (fragments already joined); `arguments` is raw JSON text."""

    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolContext:
    """Who the call is made for; webhooks receive the conversation and end user."""

    conversation_id: uuid.UUID | str | None
    end_user_external_id: str | None
    tenant_id: int


@dataclass(frozen=True)
class ToolOutcome:
    """The answer to one call. `content` is the body of the `tool` message (always JSON text);
    `error` repeats a failure in plain words for logs and events."""

    call_id: str
    name: str
    ok: bool
    content: str
    arguments: dict[str, Any] | None = None
    error: str | None = None

    @classmethod
    def success(cls, request: ToolCallRequest, arguments: dict[str, Any], content: str) -> ToolOutcome:
        return cls(call_id=request.call_id, name=request.name, ok=True, content=content, arguments=arguments)

    @classmethod
    def failure(cls, request: ToolCallRequest, error: str, arguments: dict[str, Any] | None = None) -> ToolOutcome:
        return cls(
            call_id=request.call_id,
            name=request.name,
            ok=False,
            content=json_text({"error": error}),
            arguments=arguments,
            error=error,
        )


class ToolError(Exception):
    """A failure the model should read: its message goes into the `tool` message as is.
    Tools raise it for expected failures (bad input, an unreachable webhook); any other
    exception is reported to the model only as a generic failure and logged."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def json_text(value: Any) -> str:
    """Compact JSON, non-ASCII kept (fewer tokens than escapes); raises ValueError for NaN,
    infinities and anything not JSON."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
