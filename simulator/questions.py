"""Plain questions a tool answers: arithmetic ("what is 17 * 23?", "calculate (2+3)^2") and the
time somewhere ("what time is it in Tokyo?"), so the demo shows a tool call without directives.

Only when the request offers a fitting tool, recognised by its schema (or name): one taking an
``expression`` (a calculator) or a ``timezone`` (a clock). The call's arguments are valid for
it: the expression in Python's arithmetic (``^`` → ``**``, ``×`` → ``*``, ``÷`` → ``/``), the
place as an IANA time zone name (the last part of a zone: Tokyo → Asia/Tokyo, New York →
America/New_York; ``UTC`` when no place is named). A question it cannot turn into valid
arguments (an unknown place) gets the usual text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any
from zoneinfo import available_timezones

from .request import ParsedRequest

# A cue, then at once a run of arithmetic characters (a date later in the sentence is no sum).
_ARITHMETIC = re.compile(
    r"\b(?:calculate|compute|evaluate|what\s+is|what's|whats|how\s+much\s+is)\s*:?\s*(?P<run>[\d\s.+\-*/^×÷%()]+)", re.I
)
# An operator between two operands.
_OPERATION = re.compile(r"[\d)]\s*(\*\*|[-+*/^×÷%])\s*[-+(]*\s*\d")
_TIME_QUESTION = re.compile(
    r"\b(?:what\s+time\s+is\s+it|what's\s+the\s+time|what\s+is\s+the\s+time|current\s+time|time\s+is\s+it|"
    r"the\s+time\s+now|local\s+time)\b(?:\s+(?:right\s+)?now)?(?:\s+in\s+(?P<place>[A-Za-z][A-Za-z .'_-]{0,40}?))?"
    r"\s*(?:right\s+now|now)?\s*[?.!]*\s*$",
    re.I,
)


def plain_tool_call(request: ParsedRequest) -> tuple[str, dict[str, Any]] | None:
    """(tool name, arguments) when the last user message is a plain question an offered tool
    answers; None otherwise."""
    if not request.messages or request.messages[-1]["role"] != "user":
        return None
    question = request.echo.strip()
    expression = _expression(question)
    if expression is not None:
        tool = _offered(request, parameter="expression", names=("calculator", "calculate", "calc"))
        return (tool, {"expression": expression}) if tool else None
    found = _TIME_QUESTION.search(question)
    if found is not None:
        zone = time_zone(found.group("place") or "UTC")
        tool = _offered(request, parameter="timezone", names=("current_time", "time", "clock"))
        return (tool, {"timezone": zone}) if tool and zone else None
    return None


def _expression(question: str) -> str | None:
    found = _ARITHMETIC.search(question)
    run = found.group("run").strip().rstrip(".").strip() if found else ""
    if not _OPERATION.search(run) or run.count("(") != run.count(")"):
        return None
    return run.replace("^", "**").replace("×", "*").replace("÷", "/")


def _offered(request: ParsedRequest, *, parameter: str, names: tuple[str, ...]) -> str | None:
    """The offered tool taking `parameter` (a string), else one with one of these names."""
    for name in request.tool_names:
        properties = (request.tool_schema(name) or {}).get("properties")
        if isinstance(properties, dict) and isinstance(properties.get(parameter), dict):
            return name
    return next((name for name in request.tool_names if name in names), None)


@lru_cache(maxsize=1)
def _zones() -> dict[str, str]:
    """IANA names by their lower-case full name and by their last part ("tokyo": "Asia/Tokyo")."""
    names = sorted(available_timezones() | {"UTC"})
    zones = {zone.rsplit("/", 1)[-1].lower(): zone for zone in reversed(names)}  # the first wins
    return {**zones, **{zone.lower(): zone for zone in names}}


def time_zone(place: str) -> str | None:
    """The IANA zone a place names ("new york" → "America/New_York"); None when none does."""
    key = re.sub(r"\s+", "_", place.strip().rstrip("?.!").strip()).lower()
    key = re.sub(r"^(the_)", "", key)
    return _zones().get(key)
