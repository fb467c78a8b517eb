"""One upstream round: call the model, stream its text out, collect tool calls, finish reason and usage.

Used by the chat engine (once per tool round), by summaries and by the benchmarks. What was
collected stays in the `RoundOutput` even when the call fails halfway: a cut stream is
billed for what it streamed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from llm import gateway
from llm.gateway import ChatRequest, Finish, ProviderTarget, TextDelta, ToolCallDelta, Usage
from tools.rounds import ToolCallAssembler

from .control import Control

# Takes one streamed piece of text; False when the rest of the answer is not wanted.
Deliver = Callable[[str], Awaitable[bool]]


@dataclass
class RoundOutput:
    """What one upstream call produced. `text` is filled only when no `deliver` takes it."""

    tool_calls: ToolCallAssembler = field(default_factory=ToolCallAssembler)
    finish_reason: str = ""
    usage: Usage | None = None
    text: list[str] = field(default_factory=list)

    def take(self, event: Any) -> str | None:
        """Collect one streamed event; its text, for a text delta."""
        if isinstance(event, TextDelta):
            return event.content
        if isinstance(event, ToolCallDelta):
            self.tool_calls.add(event)
        elif isinstance(event, Finish):
            self.finish_reason = event.reason
        elif isinstance(event, Usage):
            self.usage = event
        return None


async def upstream_round(
    target: ProviderTarget, request: ChatRequest, output: RoundOutput, *,
    deliver: Deliver | None = None, control: Control | None = None,
) -> None:
    """Stream one call into `output`. With a control channel, a stop ends the call at the next
    event and interrupts only the wait for the model. Raises UpstreamError."""
    events = gateway.stream_chat(target, request).__aiter__()
    try:
        while control is None or not control.stopped:
            with control.interruptible() if control is not None else nullcontext():
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    return
            text = output.take(event)
            if text is None:
                continue
            if deliver is None:
                output.text.append(text)
            elif not await deliver(text):
                return
    finally:
        await events.aclose()


async def upstream_text(target: ProviderTarget, request: ChatRequest) -> tuple[str, Usage | None]:
    """One whole answer and its usage (summaries, benchmarks). Raises UpstreamError."""
    output = RoundOutput()
    await upstream_round(target, request, output)
    return "".join(output.text).strip(), output.usage
