"""Domain errors of the chat engine; each surface maps them to its wire format in one place."""

from __future__ import annotations

from typing import Any


class ChatError(Exception):
    code = "invalid_request"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidInput(ChatError):
    code = "invalid_request"


class NotFound(ChatError):
    """Missing and foreign objects raise exactly this, with the same message."""

    code = "not_found"

    def __init__(self, noun: str) -> None:
        super().__init__(f"{noun} not found")


class Unauthorized(ChatError):
    code = "unauthorized"


class EndUserBlocked(ChatError):
    """A blocked end user, on any surface."""

    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("this end user is blocked")


class GenerationBusy(ChatError):
    """One generation at a time per conversation."""

    code = "invalid_request"

    def __init__(self) -> None:
        super().__init__("a reply is already being generated in this conversation")


class ModerationBlocked(ChatError):
    code = "moderation_blocked"


class ShuttingDown(ChatError):
    """This web process is draining for a shutdown: the turn belongs on another one.

    On a socket `rate_limited` with `retry_after`: of the contract's codes, the one that says
    "nothing is wrong with this message, send it again after `retry_after`", which clients
    already act on. REST and `/v1` answer 503 with Retry-After."""

    code = "rate_limited"

    def __init__(self, *, retry_after: float) -> None:
        super().__init__("this server is shutting down; send the message again", retry_after=retry_after)


class TurnFailed(ChatError):
    """A reply that ended with an error event (upstream failure, cancel) while a
    `stream: false` caller waited for it."""

    def __init__(self, event: dict[str, Any]) -> None:
        super().__init__(event.get("message", "the reply failed"), retry_after=event.get("retry_after"))
        self.code = event.get("code", "upstream_error")
        self.message_id = event.get("message_id")
