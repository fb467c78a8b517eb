"""Built-in tools: `current_time` and `calculator` (arithmetic parsed with `ast`, never eval'd)."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

from .calls import ToolError
from .registry import builtin

# --- current_time ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _zones() -> dict[str, str]:
    """IANA names by their lower-case form: 'europe/paris' finds 'Europe/Paris'."""
    zones = available_timezones() | {"UTC"}
    return {zone.lower(): zone for zone in zones}


@builtin(
    name="current_time",
    description="The current date and time in a time zone.",
    parameters={
        "type": "object",
        "properties": {
            "timezone": {
                "type": "string",
                "description": "IANA time zone name, such as 'Europe/Paris' or 'America/New_York'. Default: UTC.",
            }
        },
    },
)
def current_time(*, timezone: str = "UTC") -> dict[str, Any]:
    # Looked up in the list, never handed to ZoneInfo as is: a name is also a file path.
    zone = _zones().get(timezone.strip().lower())
    if zone is None:
        raise ToolError(f"unknown time zone '{timezone[:64]}'; use an IANA name such as 'Europe/Paris' or 'UTC'")
    now = datetime.now(ZoneInfo(zone)).replace(microsecond=0)
    return {"timezone": zone, "datetime": now.isoformat(), "utc_offset": _offset(now), "weekday": now.strftime("%A")}


def _offset(now: datetime) -> str:
    seconds = int(now.utcoffset().total_seconds())  # type: ignore[union-attr] — aware datetime
    hours, minutes = divmod(abs(seconds) // 60, 60)
    return f"{'-' if seconds < 0 else '+'}{hours:02d}:{minutes:02d}"


# --- calculator -----------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 500
# About 1,200 decimal digits: far past any useful arithmetic, far below a slow one.
MAX_INTEGER_BITS = 4096

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
ALLOWED = "numbers, + - * / // % **, unary + and -, and parentheses"


@builtin(
    name="calculator",
    description=f"Evaluate an arithmetic expression exactly: {ALLOWED}. Example: (2 + 3) * 4 ** 2 / 7",
    parameters={
        "type": "object",
        "properties": {"expression": {"type": "string", "description": "The arithmetic expression."}},
        "required": ["expression"],
    },
)
def calculator(*, expression: str) -> dict[str, Any]:
    return {"expression": expression, "result": calculate(expression)}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression. Raises ToolError for anything else or too large."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise ToolError(f"the expression is not valid arithmetic: {error.msg}") from None
    try:
        return _checked(_evaluate(tree.body))
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except (OverflowError, MemoryError):
        raise ToolError("the result is too large") from None
    except RecursionError:
        raise ToolError("the expression is nested too deeply") from None


def _evaluate(node: ast.expr) -> int | float:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ToolError(f"{value!r} is not a number; only {ALLOWED} are allowed")
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_evaluate(node.operand)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _power_check(left, right)
        return _checked(_BINARY[type(node.op)](left, right))
    raise ToolError(f"'{ast.unparse(node)[:40]}' is not allowed; only {ALLOWED} are")


def _power_check(base: int | float, exponent: int | float) -> None:
    """Refuse a power before computing it: 9 ** 9 ** 9 must not take the process down."""
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if (abs(base).bit_length() - 1) * exponent > MAX_INTEGER_BITS:
            raise ToolError("the result is too large")
    elif abs(exponent) > 10_000 and abs(base) not in (0, 1):
        raise ToolError("the exponent is too large")


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ToolError("the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise ToolError("the result is too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is too large")
    return value
