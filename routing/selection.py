"""A turn's model: the routes applied to what is known of the turn, with the prices billing needs.

Used by the chat turn (`conversations.turns`, on a database thread) and by `/v1` aliases
(`compat`, on the event loop). A classifier route needs an upstream call, which never runs on
a database thread: the choice raises `GradeNeeded` carrying the grading call, and the async
caller (`with_grades`) grades the question and chooses again.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from billing.caps import Subject
from billing.metering import Caps
from billing.services import Price
from llm.gateway import ProviderTarget

from .grading import GradeCall, Hop, grade
from .rules import Choice, GradeNeeded, Grades, RoutesInvalid, choose, needs_depth, routes_validate

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class TurnFacts:
    """What routing knows of a turn."""

    question: str
    input_tokens: int  # the prompt the call sends
    tools_needed: bool
    max_tokens: int  # the output bound: with the prompt, it must fit the chosen model's window
    depth: Callable[[], int] = field(default=lambda: 1)  # user messages so far; read only when a route asks


@dataclass(frozen=True)
class Grading:
    """Where a classifier route's grading call goes, and whose caps it draws on."""

    target: ProviderTarget
    subject: Subject
    caps: Caps
    conversation_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Routed:
    """The chosen model and price, and what the ledger says about the choice."""

    choice: Choice
    price: Price
    requested_price: Price

    @property
    def model(self) -> str:
        return self.choice.model

    def ledger(self, *, requested_model: str | None = None) -> dict[str, Any]:
        """CallFacts fields: the requested model and its list price when routing changed the
        model (`requested_model`: what the caller named, e.g. a `/v1` alias), the route."""
        requested = requested_model or self.choice.requested_model
        changed = requested != self.choice.model
        return {
            "requested_model": requested if changed else "",
            "route": self.choice.route_name,
            "requested_price": self.requested_price if self.choice.model != self.choice.requested_model else None,
        }


@functools.lru_cache(maxsize=1024)
def _checked(serialized: str) -> tuple[dict[str, Any], ...]:
    return tuple(routes_validate(json.loads(serialized)))


def routes_usable(routes: Any) -> list[dict[str, Any]]:
    """Stored routes, checked once per process: routes that fail validation (written behind
    the admin's and the API's back) route nothing, and say so in the log."""
    if not routes:
        return []
    try:
        return list(_checked(json.dumps(routes, sort_keys=True)))
    except (RoutesInvalid, TypeError, ValueError) as error:
        logger.warning("routes not used: %s", error)
        return []


def route_choose(
    *, routes: Any, default_model: str, default_price: Price, turn: TurnFacts, price_of: Callable[[str], Price | None],
    grading: Grading, grades: Grades | None = None,
) -> Routed:
    """The turn's model. A route whose model has no price, or whose context window the prompt
    and its output bound do not fit, is passed over. Raises GradeNeeded (with its `call`)."""
    usable_routes = routes_usable(routes)

    def usable(model: str) -> bool:
        price = price_of(model)
        return price is not None and turn.input_tokens + turn.max_tokens <= price.context_window

    grades = dict(grades or {})
    while True:
        try:
            choice = choose(
                usable_routes, default_model, question=turn.question, input_tokens=turn.input_tokens,
                tools_needed=turn.tools_needed, depth=turn.depth() if needs_depth(usable_routes) else 1,
                grades=grades, usable=usable,
            )
            break
        except GradeNeeded as needed:
            price = price_of(needed.model)
            if price is None:  # an unpriced classifier is never called: no grade, fail open
                grades[needed.model] = None
                continue
            needed.call = GradeCall(
                target=grading.target, model=needed.model, price=price, question=turn.question,
                subject=grading.subject, caps=grading.caps, route=needed.route,
                conversation_id=grading.conversation_id,
            )
            raise
    price = default_price if choice.model == default_model else price_of(choice.model)
    assert price is not None  # usable() saw it
    return Routed(choice=choice, price=price, requested_price=default_price)


async def with_grades(prepare: Callable[..., Awaitable[T]], *, hop: Hop) -> T:
    """Run `prepare(grades=..., resume=...)`, which chooses a model; each time it needs a grade,
    grade the question (an upstream call, on this event loop) and run it again with the grade
    and what it asked to resume with. One grading call per classifier model at most."""
    grades: dict[str, str | None] = {}
    resume: Any = None
    while True:
        try:
            return await prepare(grades=grades, resume=resume)
        except GradeNeeded as needed:
            if needed.call is None or needed.model in grades:
                raise
            grades = {**grades, needed.model: await grade(needed.call, hop=hop)}
            resume = needed.resume
