"""The `/v1/chat/completions` request: parsed as far as Parley relies on it, and what goes
upstream (a hashed `user`, a `max_tokens`, usage asked for when streaming)."""

from __future__ import annotations

import json
from typing import Any

from conversations.errors import InvalidInput
from conversations.protocol import InvalidFrame, json_parse

MAX_USER_CHARS = 200


class InvalidRequest(InvalidInput):
    """A malformed request body; `param` names the offending field, as OpenAI does."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# The largest output a request may ask for (an Assistant's own bound); past it a worst case
# is no longer a price (10**30 tokens overflowed the cost's Decimal: a 500).
MAX_OUTPUT_TOKENS = 2**31 - 1
# OpenAI's own bound on `n`; the hold is the output bound times n, so n needs one too.
MAX_CHOICES = 128


def _positive_int(body: dict[str, Any], name: str, *, most: int = MAX_OUTPUT_TOKENS) -> None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
        raise InvalidRequest(f"'{name}' must be an integer from 1 to {most}", param=name)


def completion_request_parse(raw: bytes) -> dict[str, Any]:
    """The request body, checked only as far as we rely on it; the provider checks the rest
    (roles, tools, response_format…) and its 400 reaches the caller. Raises InvalidRequest."""
    try:
        body = json_parse(raw)
    except InvalidFrame as error:
        raise InvalidRequest(f"the request body is not usable: {error}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("'model' is required", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("'messages' must be a non-empty array of message objects", param="messages")
    if not isinstance(body.get("stream", False), bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    _positive_int(body, "n", most=MAX_CHOICES)
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not user or len(user) > MAX_USER_CHARS):
        raise InvalidRequest(f"'user' must be a non-empty string of at most {MAX_USER_CHARS} characters", param="user")
    return body


def upstream_body(request: dict[str, Any], *, user_hash: str, default_max_tokens: int) -> bytes:
    """The caller's request with what we always send: a hashed `user`, a `max_tokens`, and,
    when streaming, `stream_options.include_usage` (usage is how the call is billed)."""
    body = dict(request)
    body["user"] = user_hash
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = default_max_tokens
    if body.get("stream"):
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def output_bound(request: dict[str, Any], *, default_max_tokens: int) -> int:
    """The most output the provider may produce and bill: the larger of `max_tokens` and
    `max_completion_tokens` (a provider honours either), the default when neither is given,
    for each of the `n` answers asked for."""
    given = [request.get(name) for name in ("max_tokens", "max_completion_tokens")]
    largest = max((value for value in given if value is not None), default=default_max_tokens)
    return largest * (request.get("n") or 1)


def user_text(messages: list[dict[str, Any]]) -> str:
    """What the caller's end user wrote: the text of every `user` message (strings and text
    parts), for the tenant's input policy. System and assistant turns are the integrator's."""
    parts: list[str] = []
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [str(part.get("text") or "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
    return "\n".join(parts)
