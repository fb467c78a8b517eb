"""Tool calls: whether this request answers with calls, which ones, and their arguments' fragments.

The rule (documented with the directives in the package docstring): a ``tool=`` directive in the
last message, when that message is the user's, asks for calls (``tool_loop=1``: on every request,
even after tool results); ``tool_choice`` "none" never calls (unless ``ignore_tool_choice=1``),
"required" and a named tool always do. After tool results the answer is text that quotes them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from .directives import Directives
from .questions import plain_tool_call
from .request import ParsedRequest, message_text

ARGUMENT_FRAGMENT_CHARS = 8
RESULT_CHARS = 80  # of each tool result quoted in the answer
_WRONG_VALUES: tuple[tuple[Any, frozenset[str]], ...] = (
    # A value, and the JSON Schema types it satisfies: bad_args picks one the property refuses.
    (12345, frozenset({"integer", "number"})),
    ("not-a-number", frozenset({"string"})),
    (True, frozenset({"boolean"})),
    (None, frozenset({"null"})),
    ([], frozenset({"array"})),
)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON text, as the model writes it (or not quite, when asked)


@dataclass(frozen=True)
class ToolDecision:
    """Calls to make, or the words that open a text answer (None: the usual echo)."""

    calls: tuple[ToolCall, ...] = ()
    head: list[str] | None = None


def decide_tools(request: ParsedRequest, directives: Directives) -> ToolDecision:
    last = request.messages[-1]["role"]
    asked = directives.tool is not None and (last == "user" or directives.tool_loop)
    text = ToolDecision(head=results_head(request.messages) if last == "tool" else None)
    if request.tool_choice == "none" and not (asked and directives.ignore_tool_choice):
        return text
    if request.tool_choice == "named":
        name = request.named_tool or ""
        wanted = [(name, _directive_arguments(directives, name) if asked else {})]
    elif asked:
        wanted = [(name, directives.arguments_for(i))
                  for i, name in enumerate(directives.tool or ())]
    elif (plain := plain_tool_call(request)) is not None:
        wanted = [plain]
    elif request.tool_choice == "required":
        wanted = [(request.tool_names[0], {})]
    else:
        return text
    missing = [name for name, _ in wanted if name not in request.tool_names]
    if missing:
        return ToolDecision(head=["Tool", missing[0], "is", "unavailable.", *request.echo_words()])
    if not request.parallel_tool_calls:
        wanted = wanted[:1]
    return ToolDecision(calls=tuple(
        ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name,
                 arguments=_arguments_text(request, directives, i, name, arguments))
        for i, (name, arguments) in enumerate(wanted)))


def _directive_arguments(directives: Directives, name: str) -> dict[str, Any]:
    names = directives.tool or ()
    return directives.arguments_for(names.index(name)) if name in names else {}


def _arguments_text(
    request: ParsedRequest, directives: Directives, index: int, name: str,
    arguments: dict[str, Any],
) -> str:
    """The call's arguments as compact JSON; the first call's spoiled on request."""
    if index == 0 and directives.bad_args:
        arguments = invalid_arguments(arguments, request.tool_schema(name))
    text = json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)
    if index == 0 and directives.bad_json:
        text = text[:-1]  # the closing brace goes missing: no longer JSON
    return text


def invalid_arguments(arguments: dict[str, Any], schema: dict[str, Any] | None) -> dict[str, Any]:
    """Still JSON, but against the schema: the first required property (else the first declared)
    gets a value of a type it refuses; with no typed property to spoil, an unknown one is added."""
    properties = (schema or {}).get("properties")
    if isinstance(properties, dict):
        required = [name for name in (schema or {}).get("required", []) if name in properties]
        for name in required + [name for name in properties if name not in required]:
            wrong = _wrong_value(properties[name])
            if wrong is not _NO_WRONG_VALUE:
                return {**arguments, name: wrong}
    return {**arguments, "unexpected_argument": True}


_NO_WRONG_VALUE = object()


def _wrong_value(schema: Any) -> Any:
    declared = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(declared, str):
        declared = [declared]
    if not isinstance(declared, list):
        return _NO_WRONG_VALUE
    for value, satisfies in _WRONG_VALUES:
        if not satisfies & set(declared):
            return value
    return _NO_WRONG_VALUE


def argument_fragments(arguments: str) -> list[str]:
    """The arguments text in pieces, as OpenAI streams them: several, unless it is one char."""
    size = ARGUMENT_FRAGMENT_CHARS if len(arguments) > ARGUMENT_FRAGMENT_CHARS else (
        max(1, len(arguments) // 2))
    return [arguments[i:i + size] for i in range(0, len(arguments), size)] or [""]


def results_head(messages: list[dict[str, Any]]) -> list[str]:
    """``Tool results: NAME: CONTENT; NAME: CONTENT.`` for the tool messages at the end."""
    first = len(messages)
    while first > 0 and messages[first - 1]["role"] == "tool":
        first -= 1
    calls = (messages[first - 1].get("tool_calls") if first > 0 else None) or []
    names = {call["id"]: call["function"]["name"] for call in calls}
    words = ["Tool", "results:"]
    for message in messages[first:]:
        quoted = " ".join(message_text(message).split())[:RESULT_CHARS].split() or ["(empty)"]
        words += [f"{names.get(message['tool_call_id'], 'unknown')}:", *quoted]
        words[-1] += ";"
    words[-1] = words[-1][:-1] + "."
    return words
