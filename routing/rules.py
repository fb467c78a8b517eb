"""Routes: their shape (validated with jsonschema) and the pure choice of a model for one turn.

A route is `{"name", "model", "when": {...}}`; routes are ordered, the first whose every
condition holds wins, the assistant's (or alias's) own model otherwise. Conditions: the
prompt's input tokens at most N, a regular expression on the question, tools needed or not,
the conversation's depth (user messages, this one included) within bounds, and a classifier's
grade of the question. An absent condition holds for any turn.

A tenant's pattern runs on Parley's threads, so it is bounded three ways: at most
`PATTERN_MAX_CHARS` characters, matched against the first `QUESTION_MATCH_CHARS` characters
of the question, with the `regex` library's timeout (`PATTERN_TIMEOUT_SECONDS`); a pattern that
times out does not match (the next route is tried).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema
import regex

logger = logging.getLogger(__name__)

MAX_ROUTES = 16
PATTERN_MAX_CHARS = 200
QUESTION_MATCH_CHARS = 4_000
PATTERN_TIMEOUT_SECONDS = 0.02  # per question and pattern: a thread is held at most this long
LABELS = ("simple", "complex")

_NAME = {"type": "string", "minLength": 1, "maxLength": 100, "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"}
_MODEL = {"type": "string", "minLength": 1, "maxLength": 100}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 10_000_000}
ROUTES_SCHEMA: dict[str, Any] = {
    "type": "array",
    "maxItems": MAX_ROUTES,
    "items": {
        "type": "object",
        "required": ["name", "model"],
        "additionalProperties": False,
        "properties": {
            "name": _NAME,
            "model": _MODEL,
            "when": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "max_input_tokens": _COUNT,
                    "pattern": {"type": "string", "minLength": 1, "maxLength": PATTERN_MAX_CHARS},
                    "tools": {"type": "boolean"},
                    "min_depth": _COUNT,
                    "max_depth": _COUNT,
                    "classifier": {
                        "type": "object",
                        "required": ["model", "label"],
                        "additionalProperties": False,
                        "properties": {"model": _MODEL, "label": {"enum": list(LABELS)}},
                    },
                },
            },
        },
    },
}
_validator = jsonschema.Draft202012Validator(ROUTES_SCHEMA)


class RoutesInvalid(ValueError):
    """Routes that cannot be used; the message says which route and why."""


def _where(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
    return f"routes{path}" if path else "routes"


def routes_validate(routes: Any) -> list[dict[str, Any]]:
    """The routes, checked: shape, unique names, patterns that compile, depth bounds in order.
    Raises RoutesInvalid with every problem found."""
    if routes is None:
        return []
    problems = [f"{_where(error)}: {error.message}" for error in _validator.iter_errors(routes)]
    if problems:
        raise RoutesInvalid("; ".join(sorted(problems)))
    seen: set[str] = set()
    for index, route in enumerate(routes):
        where, when = f"routes[{index}]", route.get("when") or {}
        if route["name"] in seen:
            problems.append(f"{where}.name: {route['name']!r} is used by an earlier route")
        seen.add(route["name"])
        if "pattern" in when:
            try:
                regex.compile(when["pattern"])
            except regex.error as error:
                problems.append(f"{where}.when.pattern: not a valid regular expression ({error})")
        if when.get("min_depth", 0) > when.get("max_depth", 10_000_000):
            problems.append(f"{where}.when: min_depth is greater than max_depth")
    if problems:
        raise RoutesInvalid("; ".join(problems))
    return routes


@dataclass(frozen=True)
class Choice:
    """The model that answers, and the route that chose it ("" when no route matched)."""

    model: str
    route_name: str = ""
    requested_model: str = ""  # the assistant's or alias's model

    @property
    def routed(self) -> bool:
        return bool(self.route_name) and self.model != self.requested_model


class GradeNeeded(Exception):
    """The next route to try asks a classifier, and its grade is not known yet: grade the
    question with `model` and choose again with the grade in `grades`."""

    def __init__(self, model: str, *, route: str = "") -> None:
        super().__init__(f"the question needs a grade from {model}")
        self.model = model
        self.route = route
        self.call: Any = None  # the grading call (routing.grading.GradeCall), set by who can place it
        self.resume: Any = None  # what the caller that raised it resumes with


Grades = Mapping[str, str | None]  # classifier model → its label, None when grading failed


def needs_depth(routes: list[dict[str, Any]]) -> bool:
    return any({"min_depth", "max_depth"} & set(route.get("when") or {}) for route in routes)


def choose(
    routes: list[dict[str, Any]], default_model: str, *, question: str, input_tokens: int, tools_needed: bool,
    depth: int, grades: Grades | None = None, usable: Callable[[str], bool] | None = None,
) -> Choice:
    """The first route whose conditions all hold and whose model is `usable` (priced, and the
    prompt fits its window), else the default. Raises GradeNeeded when the next route to try
    asks a classifier whose grade is not in `grades`."""
    grades = grades or {}
    for route in routes:
        when = route.get("when") or {}
        if not _static_match(when, question=question, input_tokens=input_tokens, tools_needed=tools_needed,
                             depth=depth, route=route["name"]):
            continue
        if usable is not None and not usable(route["model"]):
            continue
        classifier = when.get("classifier")
        if classifier is not None:
            if classifier["model"] not in grades:
                raise GradeNeeded(classifier["model"], route=route["name"])
            if grades[classifier["model"]] != classifier["label"]:
                continue  # includes a failed grading: fail open to the next route
        return Choice(model=route["model"], route_name=route["name"], requested_model=default_model)
    return Choice(model=default_model, requested_model=default_model)


def _static_match(when: dict[str, Any], *, question: str, input_tokens: int, tools_needed: bool, depth: int,
                  route: str) -> bool:
    if "max_input_tokens" in when and input_tokens > when["max_input_tokens"]:
        return False
    if "tools" in when and when["tools"] != tools_needed:
        return False
    if depth < when.get("min_depth", 0) or ("max_depth" in when and depth > when["max_depth"]):
        return False
    return "pattern" not in when or pattern_matches(when["pattern"], question, route=route)


def pattern_matches(pattern: str, question: str, *, route: str = "") -> bool:
    """A bounded search: the first QUESTION_MATCH_CHARS characters, within the timeout. A
    pattern that times out (or no longer compiles) does not match."""
    try:
        return regex.search(
            pattern, question[:QUESTION_MATCH_CHARS], timeout=PATTERN_TIMEOUT_SECONDS,
        ) is not None
    except (TimeoutError, regex.error):
        logger.warning("route %r: its pattern did not finish in time or does not compile; not matched", route)
        return False
