"""The tool registry: built-in Python tools and each tenant's webhook tools, looked up by name.

Built-ins register with the `builtin` decorator and an explicit JSON Schema for their arguments:

    @builtin(name="current_time", description="...", parameters={"type": "object", ...})
    def current_time(*, timezone: str = "UTC") -> dict: ...

The handler receives the validated arguments as keyword arguments (and the ToolContext as
`context` when it declares that parameter) and returns a JSON-serialisable value. Async handlers
are awaited; sync ones run inline on the event loop, so they must stay CPU-light. A handler
raises ToolError for a failure the model should read.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .calls import ToolContext
from .models import WebhookTool
from .validation import TOOL_NAME_RE, schema_check, strict_schema
from .webhooks import WebhookTarget, webhook_call

logger = logging.getLogger(__name__)

# run(arguments, context, call_id) -> a JSON-serialisable result
ToolRun = Callable[[dict[str, Any], ToolContext, str], Awaitable[Any]]
DEFAULT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Tool:
    """Anything the model can call: a name, what it does, its arguments' schema, how to run it."""

    name: str
    description: str
    parameters: dict[str, Any]
    run: ToolRun = field(repr=False, compare=False)
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    # OpenAI's strict mode (constrained decoding) needs every property required; opt-in.
    strict: bool = False

    def definition(self) -> dict[str, Any]:
        return tool_definition(
            name=self.name, description=self.description, parameters=self.parameters, strict=self.strict
        )


BUILTINS: dict[str, Tool] = {}


def tool_definition(*, name: str, description: str, parameters: dict[str, Any], strict: bool = False) -> dict[str, Any]:
    """One OpenAI `tools` entry. Keys in a fixed order and the schema's keys sorted, so the
    same tool always serialises to the same bytes (a stable prompt prefix caches)."""
    function: dict[str, Any] = {
        "name": name,
        "description": description,
        "parameters": _sorted_keys(strict_schema(parameters)),
    }
    if strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def tool_register(tool: Tool) -> Tool:
    """Add a built-in. Raises ValueError for a bad name or schema, or a name already taken."""
    if not TOOL_NAME_RE.match(tool.name):
        raise ValueError(f"invalid tool name {tool.name!r}")
    schema_check(tool.parameters)
    if tool.name in BUILTINS:
        raise ValueError(f"a built-in tool named {tool.name!r} is already registered")
    BUILTINS[tool.name] = tool
    return tool


def builtin(
    *,
    name: str,
    description: str,
    parameters: dict[str, Any],
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    strict: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as a built-in tool (see the module docstring)."""

    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        tool_register(
            Tool(
                name=name,
                description=description,
                parameters=parameters,
                run=handler_run(handler),
                timeout_seconds=timeout_seconds,
                strict=strict,
            )
        )
        return handler

    return register


def handler_run(handler: Callable[..., Any]) -> ToolRun:
    """Adapt a keyword-argument handler to the ToolRun calling convention."""
    wants_context = "context" in inspect.signature(handler).parameters

    async def run(arguments: dict[str, Any], context: ToolContext, call_id: str) -> Any:
        kwargs = {**arguments, "context": context} if wants_context else arguments
        result = handler(**kwargs)
        return await result if inspect.isawaitable(result) else result

    return run


def webhook_tool(hook: WebhookTool) -> Tool:
    target = WebhookTarget(url=hook.url, secret=hook.secret, timeout_seconds=hook.timeout_seconds)
    name = hook.name

    async def run(arguments: dict[str, Any], context: ToolContext, call_id: str) -> Any:
        return await webhook_call(target=target, name=name, arguments=arguments, context=context, call_id=call_id)

    return Tool(
        name=hook.name,
        description=hook.description,
        parameters=hook.parameters,
        run=run,
        timeout_seconds=float(hook.timeout_seconds),
    )


def _split(names: Iterable[str]) -> tuple[list[str], list[str]]:
    wanted = sorted(set(names))
    return [n for n in wanted if n in BUILTINS], [n for n in wanted if n not in BUILTINS]


def tool_definitions(*, tenant_id: int, names: list[str]) -> list[dict[str, Any]]:
    """OpenAI `tools` entries for the enabled `names` that exist (built-ins, then the tenant's
    active webhook tools), sorted by name. Unknown names are skipped with a warning. Sync, at
    most one query: call it inside the engine's database hop."""
    builtin_names, other_names = _split(names)
    found = {name: BUILTINS[name].definition() for name in builtin_names}
    if other_names:
        hooks = (
            WebhookTool.objects.for_tenant(tenant_id)
            .filter(name__in=other_names, is_active=True)
            .values_list("name", "description", "parameters")
        )
        for name, description, parameters in hooks:
            found[name] = tool_definition(name=name, description=description, parameters=parameters)
    missing = sorted(set(builtin_names + other_names) - set(found))
    if missing:
        logger.warning("tenant %s enables unknown or inactive tools: %s", tenant_id, ", ".join(missing))
    return [found[name] for name in sorted(found)]


async def tools_resolve(*, tenant_id: int, names: Iterable[str]) -> dict[str, Tool]:
    """The callable tools among `names`: built-ins and the tenant's active webhook tools."""
    builtin_names, other_names = _split(names)
    tools = {name: BUILTINS[name] for name in builtin_names}
    if other_names:
        queryset = WebhookTool.objects.for_tenant(tenant_id).filter(name__in=other_names, is_active=True)
        async for hook in queryset:
            tools[hook.name] = webhook_tool(hook)
    return tools


def tools_missing(*, tenant_id: int, names: Iterable[str]) -> list[str]:
    """The names among `names` that are neither built-ins nor the tenant's active webhook tools."""
    builtin_names, other_names = _split(names)
    found = set(WebhookTool.objects.for_tenant(tenant_id).filter(name__in=other_names, is_active=True)
                .values_list("name", flat=True)) if other_names else set()
    return [name for name in other_names if name not in found]
