"""Tool rounds of a turn: assemble streamed call fragments, run the calls, shape the messages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llm.gateway import ToolCallDelta
from tools.calls import ToolCallRequest, ToolOutcome


@dataclass
class _Fragments:
    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class ToolCallAssembler:
    """Joins the fragments the model streams (first the id and name, then the arguments in
    pieces, keyed by index) into whole calls."""

    def __init__(self) -> None:
        self._calls: dict[int, _Fragments] = {}

    def add(self, delta: ToolCallDelta) -> None:
        call = self._calls.setdefault(delta.index, _Fragments())
        if delta.call_id:
            call.call_id = delta.call_id
        if delta.name:
            call.name += delta.name
        if delta.arguments:
            call.arguments.append(delta.arguments)

    def __bool__(self) -> bool:
        return bool(self._calls)

    def requests(self) -> list[ToolCallRequest]:
        return [
            ToolCallRequest(call_id=call.call_id or f"call_{index}", name=call.name, arguments="".join(call.arguments))
            for index, call in sorted(self._calls.items())
        ]


def wire_tool_calls(requests: list[ToolCallRequest]) -> list[dict[str, Any]]:
    """The assistant message's `tool_calls`, exactly as the model sent them (so replaying the
    history shows the model its own words, invalid arguments included)."""
    return [
        {"id": r.call_id, "type": "function", "function": {"name": r.name, "arguments": r.arguments}}
        for r in requests
    ]


def arguments_object(request: ToolCallRequest, outcome: ToolOutcome) -> dict[str, Any]:
    """For the `tool.call` event: the parsed arguments, or what could be parsed of them."""
    if outcome.arguments is not None:
        return outcome.arguments
    try:
        parsed = json.loads(request.arguments)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}

