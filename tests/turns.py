"""A turn's upstream leg outside the engine's generation task: for tests and benchmarks that
drive the services directly, one thread (and its own event loop) per turn."""

from __future__ import annotations

import asyncio

from conversations.answers import TurnOutcome
from conversations.turns import TurnPlan
from conversations.upstream import RoundOutput, upstream_round
from llm.gateway import UpstreamError


def turn_upstream(plan: TurnPlan) -> TurnOutcome:
    """The engine's upstream round, run to completion in this thread's own event loop."""

    async def consume() -> UpstreamError | None:
        try:
            await upstream_round(plan.target, plan.request, output)
        except UpstreamError as failure:
            return failure
        return None

    output = RoundOutput()
    error = asyncio.run(consume())
    parts, usage, finish = output.text, output.usage, output.finish_reason
    return TurnOutcome(
        called_upstream=True,
        content="".join(parts),
        status="complete" if error is None else "incomplete",
        finish_reason=finish or "error",
        usage=usage,
        error=error,
        streamed=bool(parts),
        latency_ms=1,
        ttft_ms=1,
        usage_outcome="ok" if error is None else "error",
    )
