"""One reply on the wire: a ``chat.completion`` body or its event stream, booked in the stats."""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn, Protocol

from .asgi import Headers, Send, dumps, send_body, sleep_until, sse
from .errors import StreamCut
from .plan import ReplyPlan


class Simulator(Protocol):
    """What a reply books into: the simulator's counters (app.Simulator, which imports this
    module, so it is described here rather than imported)."""

    stats: Any

HANG_SECONDS = 3600.0
SYSTEM_FINGERPRINT = "fp_parleysim"
DONE_EVENT = b"data: [DONE]\n\n"
MALFORMED_EVENT = b"data: {this is not json\n\n"


def completion_body(plan: ReplyPlan) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": plan.content}
    if plan.tool_calls:
        message["tool_calls"] = plan.tool_calls
    message |= {"refusal": None, "annotations": []}
    return {
        "id": plan.id, "object": "chat.completion", "created": plan.created, "model": plan.model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": plan.finish_reason}],
        "usage": plan.usage(), "service_tier": "default", "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def chunk_event(plan: ReplyPlan, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    chunk: dict[str, Any] = {
        "id": plan.id, "object": "chat.completion.chunk", "created": plan.created,
        "model": plan.model, "service_tier": "default", "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if plan.include_usage:
        chunk["usage"] = None
    return sse(chunk)


def usage_event(plan: ReplyPlan) -> bytes:
    return sse({
        "id": plan.id, "object": "chat.completion.chunk", "created": plan.created,
        "model": plan.model, "service_tier": "default", "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [], "usage": plan.usage(),
    })


class Reply:
    """Renders one plan as a stream or a JSON body; books it in the stats exactly once."""

    def __init__(self, sim: Simulator, plan: ReplyPlan, send: Send, headers: Headers) -> None:
        self.sim, self.plan, self.send, self.headers = sim, plan, send, headers
        self.outcome: str | None = None
        self.stop_at, self.action = plan.interruption or (len(plan.deltas), "")

    def settle(self, outcome: str) -> None:
        """Book "completed" or "incomplete" once: a hang may later also see a disconnect."""
        if self.outcome is None:
            self.outcome = outcome
            if outcome == "completed":
                self.sim.stats.completions += 1
                self.sim.stats.tool_calls += len(self.plan.tool_calls)
            else:
                self.sim.stats.incomplete += 1

    async def stream(self) -> None:
        plan = self.plan
        if self.action == "hang" and self.stop_at == 0:
            await self._hang()
        await asyncio.sleep(plan.ttft)
        await self._start("text/event-stream; charset=utf-8")
        await send_body(self.send, chunk_event(plan, plan.opening))
        start = asyncio.get_running_loop().time()
        for i, delta in enumerate(plan.deltas[: self.stop_at]):
            await sleep_until(start + i * plan.interval)
            await send_body(self.send, chunk_event(plan, delta))
            # Booked right after the send and before any other await: a client that has seen
            # this chunk and then reads the stats finds it counted.
            self.sim.stats.completion_tokens += plan.delta_tokens[i]
        if self.action:
            return await self._interrupt_stream()
        await send_body(self.send, chunk_event(plan, {}, plan.finish_reason))
        if plan.include_usage:
            await send_body(self.send, usage_event(plan))
        self.settle("completed")
        await self.send({"type": "http.response.body", "body": DONE_EVENT})

    async def _interrupt_stream(self) -> None:
        if self.action == "cut":
            self._cut()
        if self.action == "malformed":
            self.settle("incomplete")
            return await self.send({"type": "http.response.body", "body": MALFORMED_EVENT})
        await self._hang()

    async def json(self) -> None:
        plan = self.plan
        if self.action == "hang":
            await self._hang()
        # A non-streamed answer arrives when the whole generation is done.
        await asyncio.sleep(plan.ttft + plan.interval * max(0, len(plan.deltas) - 1))
        if self.action == "malformed":
            self.settle("incomplete")
            await self._start("application/json")
            return await self.send({"type": "http.response.body", "body": b"{this is not json"})
        body = dumps(completion_body(plan))
        await self._start("application/json", content_length=len(body))
        if self.action == "cut":
            await send_body(self.send, body[: len(body) // 2])
            self._cut()
        self.sim.stats.completion_tokens += plan.completion_tokens
        self.settle("completed")
        await self.send({"type": "http.response.body", "body": body})

    async def _start(self, content_type: str, content_length: int | None = None) -> None:
        headers = [(b"content-type", content_type.encode()), *self.headers]
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _hang(self) -> None:
        self.settle("incomplete")
        await asyncio.sleep(HANG_SECONDS)  # until the client gives up and disconnects

    def _cut(self) -> NoReturn:
        self.settle("incomplete")
        raise StreamCut("simulated connection cut")

