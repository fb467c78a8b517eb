"""Running the tool calls of one model turn: validate each, run the valid ones concurrently.

Nothing here raises for a bad call or a failing tool: every call gets a ToolOutcome, and a
refused or failed one carries a message the model can act on in its next round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from .calls import ToolCallRequest, ToolContext, ToolError, ToolOutcome, json_text
from .registry import BUILTINS, Tool, tools_resolve
from .validation import ArgumentsInvalid, arguments_parse

logger = logging.getLogger(__name__)

# A model asking for more than this in one turn is looping or was talked into fanning out
# to the tenant's webhooks; the extra calls are refused, not queued.
MAX_CALLS_PER_TURN = 16


async def tool_calls_execute(
    *,
    tenant_id: int,
    calls: Sequence[ToolCallRequest],
    context: ToolContext,
    names: Sequence[str],
) -> list[ToolOutcome]:
    """One outcome per call, in the calls' order.

    Only tools in `names` (the assistant's enabled tools) can run: any other name, or arguments
    that are not JSON or do not match the tool's schema, is answered without running anything.
    Valid calls run concurrently, each within its tool's timeout. One query at most (the
    tenant's webhook tools)."""
    if not calls:
        return []
    tools, unavailable = await _tools_load(tenant_id, names)
    outcomes: list[ToolOutcome | None] = []
    runs: list[Any] = []
    for position, request in enumerate(calls):
        prepared = _prepare(request, tools, unavailable, position)
        if isinstance(prepared, ToolOutcome):
            logger.info("tool call %s (%s) refused: %s", request.call_id, request.name[:64], prepared.error)
            outcomes.append(prepared)
        else:
            tool, arguments = prepared
            outcomes.append(None)
            runs.append(_run(tool, request, arguments, context))
    results = iter(await asyncio.gather(*runs))
    return [outcome if outcome is not None else next(results) for outcome in outcomes]


async def _tools_load(tenant_id: int, names: Sequence[str]) -> tuple[dict[str, Tool], frozenset[str]]:
    """The enabled tools, and the names that exist but could not be loaded this time."""
    try:
        return await tools_resolve(tenant_id=tenant_id, names=names), frozenset()
    except Exception:  # noqa: BLE001 — e.g. a webhook secret no configured key decrypts
        logger.exception("tenant %s: webhook tools could not be loaded", tenant_id)
        builtins = await tools_resolve(tenant_id=tenant_id, names=[name for name in names if name in BUILTINS])
        return builtins, frozenset(names) - frozenset(builtins)


def _prepare(
    request: ToolCallRequest, tools: dict[str, Tool], unavailable: frozenset[str], position: int
) -> ToolOutcome | tuple[Tool, dict[str, Any]]:
    """The tool and validated arguments to run, or the refusal that answers the call instead."""
    if position >= MAX_CALLS_PER_TURN:
        message = f"too many tool calls in one turn (at most {MAX_CALLS_PER_TURN}); this call was not run"
        return ToolOutcome.failure(request, message)
    if request.name in unavailable:
        return ToolOutcome.failure(request, f"tool '{request.name}' is unavailable right now; try again later")
    tool = tools.get(request.name)
    if tool is None:
        return ToolOutcome.failure(request, _unknown_tool(request.name, tools))
    try:
        arguments = arguments_parse(raw=request.arguments, schema=tool.parameters)
    except ArgumentsInvalid as error:
        message = f"invalid arguments for tool '{tool.name}', the call was not run: {error}"
        return ToolOutcome.failure(request, message, error.arguments)
    except Exception:  # noqa: BLE001 — a schema that got past validation (written around the services)
        logger.exception("tool %s: its parameters schema cannot validate arguments", tool.name)
        return ToolOutcome.failure(request, f"tool '{tool.name}' is misconfigured and cannot be called")
    return tool, arguments


def _unknown_tool(name: str, tools: dict[str, Tool]) -> str:
    shown = name if len(name) <= 64 else name[:64] + "…"
    available = ", ".join(sorted(tools)) or "none"
    return f"there is no tool named '{shown}'; available tools: {available}"


async def _run(tool: Tool, request: ToolCallRequest, arguments: dict[str, Any], context: ToolContext) -> ToolOutcome:
    started = time.monotonic()
    try:
        async with asyncio.timeout(tool.timeout_seconds):
            result = await tool.run(arguments, context, request.call_id)
    except ToolError as error:
        outcome = ToolOutcome.failure(request, error.message, arguments)
    except TimeoutError:
        outcome = ToolOutcome.failure(request, f"the tool did not finish within {tool.timeout_seconds:g} s", arguments)
    except Exception:  # noqa: BLE001 — a tool's bug is the model's tool error, not the turn's crash
        logger.exception("tool %s (call %s) failed", tool.name, request.call_id)
        outcome = ToolOutcome.failure(request, "the tool failed unexpectedly", arguments)
    else:
        outcome = _result_outcome(tool, request, arguments, result)
    logger.info(
        "tool %s call %s ok=%s in %d ms", tool.name, request.call_id, outcome.ok, (time.monotonic() - started) * 1000
    )
    return outcome


def _result_outcome(tool: Tool, request: ToolCallRequest, arguments: dict[str, Any], result: Any) -> ToolOutcome:
    try:
        content = json_text(result)
    except (TypeError, ValueError):
        logger.error("tool %s returned a value that is not JSON: %s", tool.name, type(result).__name__)
        return ToolOutcome.failure(request, "the tool returned a result that is not JSON", arguments)
    return ToolOutcome.success(request, arguments, content)
