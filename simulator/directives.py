"""``[[sim:KEY=VALUE …]]`` directives: parsed from the last user message, stripped from all text.

A block ends at the first ``]]`` outside JSON brackets and strings, and its items are split on
whitespace outside them too, so ``args=[{"expression": "2 + 2"}]`` is one item.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import ApiError

OPEN = "[[sim:"


@dataclass(frozen=True)
class Directives:
    """Faults and overrides for one request; None / False means "not asked for"."""

    status: int | None = None
    retry_after: float | None = None
    retry_after_date: bool = False  # send Retry-After as an HTTP date (no retry-after-ms)
    fail_times: int | None = None
    hang: bool = False
    hang_after: int | None = None
    cut: int | None = None
    malformed: int | None = None
    words: int | None = None
    ttft_ms: float | None = None
    tps: float | None = None
    tool: tuple[str, ...] | None = None           # tool names to call, in order
    args: tuple[dict[str, Any], ...] | None = None  # their arguments, aligned with ``tool``
    bad_args: bool = False
    bad_json: bool = False
    tool_loop: bool = False
    ignore_tool_choice: bool = False  # as many OpenAI-compatible servers do with "none"
    nocache: bool = False

    def __post_init__(self) -> None:
        # ``inject(tool="calculator", args={...})`` takes the directive's plain forms too.
        if isinstance(self.tool, str):
            object.__setattr__(self, "tool", _names(self.tool))
        if isinstance(self.args, (dict, list)):
            object.__setattr__(self, "args", _argument_objects(self.args))

    def overridden_by(self, other: Directives) -> Directives:
        changes = {f.name: getattr(other, f.name) for f in fields(other)
                   if getattr(other, f.name) not in (None, False)}
        return replace(self, **changes)

    def interruption(self) -> tuple[int, str] | None:
        """(content chunks to send first, "cut" | "malformed" | "hang"), the earliest asked for."""
        if self.hang:
            return (0, "hang")
        asked = [(n, kind) for n, kind in
                 ((self.cut, "cut"), (self.malformed, "malformed"), (self.hang_after, "hang"))
                 if n is not None]
        return min(asked, key=lambda item: item[0]) if asked else None

    def arguments_for(self, index: int) -> dict[str, Any]:
        """The arguments of the index-th named call; ``{}`` when the directive gives none."""
        if self.args is None or index >= len(self.args):
            return {}
        return self.args[index]


def _flag(value: str) -> bool:
    return value not in ("0", "false")


def _names(value: str) -> tuple[str, ...]:
    names = tuple(name for name in value.split(",") if name)
    if not names:
        raise ValueError("no tool name")
    return names


def _arguments(value: str) -> tuple[dict[str, Any], ...]:
    return _argument_objects(json.loads(value))


def _argument_objects(parsed: Any) -> tuple[dict[str, Any], ...]:
    if isinstance(parsed, dict):
        return (parsed,)
    if isinstance(parsed, list) and all(isinstance(item, dict) for item in parsed):
        return tuple(parsed)
    raise ValueError("args must be a JSON object or a list of objects")


_DIRECTIVE_TYPES: dict[str, Callable[[str], Any]] = {
    "status": int, "retry_after": float, "retry_after_date": _flag, "fail_times": int, "hang_after": int, "cut": int,
    "malformed": int, "words": int, "ttft_ms": float, "tps": float, "hang": _flag,
    "tool": _names, "args": _arguments, "bad_args": _flag, "bad_json": _flag,
    "tool_loop": _flag, "nocache": _flag, "ignore_tool_choice": _flag,
}


def parse_directives(text: str) -> tuple[Directives, str]:
    """Directives found in ``text`` and the text without them. Raises ApiError (400)."""
    values: dict[str, Any] = {}
    for _, _, block in directive_blocks(text):
        for item in _top_level_split(block):
            key, _, raw = item.partition("=")
            try:
                values[key] = _DIRECTIVE_TYPES[key](raw)
            except (KeyError, ValueError):
                raise ApiError(400, f"Invalid simulator directive {item!r}.",
                               param="messages") from None
    return Directives(**values), " ".join(strip_directives(text, " ").split())


def strip_directives(text: str, replacement: str = "") -> str:
    if OPEN not in text:
        return text
    kept, position = [], 0
    for start, end, _ in directive_blocks(text):
        kept += [text[position:start], replacement]
        position = end
    return "".join(kept) + text[position:]


def directive_blocks(text: str) -> list[tuple[int, int, str]]:
    """(start, end, inside) of every complete ``[[sim:…]]`` block of the text."""
    blocks = []
    start = text.find(OPEN)
    while start != -1:
        inside = start + len(OPEN)
        close = _block_close(text, inside)
        if close is None:
            break
        blocks.append((start, close + 2, text[inside:close]))
        start = text.find(OPEN, close + 2)
    return blocks


def _block_close(text: str, position: int) -> int | None:
    """Index of the ``]]`` closing a block: the first one outside JSON strings and brackets."""
    for i, char, depth in _scan(text, position):
        if char == "]" and depth == 0 and text.startswith("]]", i):
            return i
    return None


def _top_level_split(block: str) -> list[str]:
    """Whitespace-separated items, where JSON strings and brackets keep their spaces."""
    cuts = [i for i, char, depth in _scan(block) if depth == 0 and char.isspace()]
    items = [block[a + 1:b] for a, b in zip([-1, *cuts], [*cuts, len(block)], strict=True)]
    return [item for item in items if item]


def _scan(text: str, position: int = 0) -> Iterator[tuple[int, str, int]]:
    """(index, char, bracket depth) of each character outside JSON strings."""
    depth, in_string, escaped = 0, False, False
    for i in range(position, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        yield i, char, depth
        if char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
