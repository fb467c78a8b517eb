"""A turn's upstream leg outside the engine's generation task: for tests and benchmarks that
drive the services directly, one thread (and its own event loop) per turn."""

from __future__ import annotations

import asyncio

from conversations.answers import TurnOutcome
from conversations.turns import TurnPlan
from llm import gateway
from llm.gateway import Finish, TextDelta, UpstreamError, Usage


def turn_upstream(plan: TurnPlan) -> TurnOutcome:
    """The engine's upstream leg, run to completion in this thread's own event loop."""

    async def consume():
        parts, usage, finish, error = [], None, "", None
        try:
            async for event in gateway.stream_chat(plan.target, plan.request):
                if isinstance(event, TextDelta):
                    parts.append(event.content)
                elif isinstance(event, Usage):
                    usage = event
                elif isinstance(event, Finish):
                    finish = event.reason
        except UpstreamError as failure:
            error = failure
        return parts, usage, finish, error

    parts, usage, finish, error = asyncio.run(consume())
    return TurnOutcome(
        called_upstream=True,
        content="".join(parts),
        status="complete" if error is None else "incomplete",
        finish_reason=finish or "error",
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        cached_tokens=usage.cached_tokens if usage else 0,
        latency_ms=1,
        ttft_ms=1,
        usage_outcome="ok" if error is None else "error",
    )
