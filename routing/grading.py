"""A classifier route's grading call: a cheap model answers one word, `simple` or `complex`.

The call is metered like any other (billing.metering: held against the caps, booked as one
`chat` UsageRecord whose call id starts `grade-` and whose `route` names the route that asked),
and it fails open: a refused hold, an upstream error, a timeout or an answer that is neither
word is no grade, and routing goes on to the next route.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from billing.caps import CapExceeded, Subject
from billing.metering import CallFacts, Caps, call_book, call_hold_async
from billing.models import UsageRecord
from billing.services import Price
from llm import gateway
from llm.gateway import ChatRequest, ProviderTarget, TextDelta, UpstreamError, Usage
from llm.tokens import count_messages

from .rules import LABELS

logger = logging.getLogger(__name__)

Hop = Callable[..., Awaitable[Any]]

GRADING_PROMPT = (
    "You grade questions sent to a support assistant. Answer with one word: simple or complex. "
    "simple: a short factual question that one or two sentences answer. "
    "complex: it needs reasoning, several steps, comparison or expertise."
)
GRADE_MAX_TOKENS = 4
QUESTION_GRADED_CHARS = 4_000
# The whole grading call, retries included: past it the turn goes on ungraded (fail open).
GRADE_TIMEOUT_SECONDS = 10.0  # the grade is about the question's kind, not all of its text


@dataclass(frozen=True)
class GradeCall:
    """Everything one grading call needs: where it goes, at what price, for whom."""

    target: ProviderTarget
    model: str
    price: Price
    question: str
    subject: Subject
    caps: Caps
    route: str = ""
    conversation_id: uuid.UUID | None = None


def grading_messages(question: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": GRADING_PROMPT},
        {"role": "user", "content": question[:QUESTION_GRADED_CHARS]},
    ]


def label_of(text: str) -> str | None:
    words = text.strip().lower().split()
    word = words[0].strip(".,!:;\"'") if words else ""
    return word if word in LABELS else None


async def grade(call: GradeCall, *, hop: Hop) -> str | None:
    """The question's grade, or None when it could not be had (routing fails open)."""
    request = ChatRequest(model=call.model, messages=grading_messages(call.question), max_tokens=GRADE_MAX_TOKENS,
                          temperature=0)
    try:
        hold = await call_hold_async(
            subject=call.subject, caps=call.caps, price=call.price, model=call.model, hop=hop, leases_ok=False,
            prompt_tokens=count_messages(request.messages, call.model), max_tokens=GRADE_MAX_TOKENS,
            call_id=f"grade-{uuid.uuid4()}",
        )
    except CapExceeded:
        logger.info("route %r: the grading call does not fit the caps; not graded", call.route)
        return None
    parts: list[str] = []
    usage: Usage | None = None
    error: BaseException | None = None
    started = time.monotonic()
    try:
        async with asyncio.timeout(GRADE_TIMEOUT_SECONDS):
            async with contextlib.aclosing(gateway.stream_chat(call.target, request)) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        parts.append(event.content)
                    elif isinstance(event, Usage):
                        usage = event
    except (UpstreamError, TimeoutError) as failure:
        error = failure
    finally:
        facts = CallFacts(
            kind=UsageRecord.Kind.CHAT, route=call.route, conversation_id=call.conversation_id,
            outcome=UsageRecord.Outcome.OK if error is None else UsageRecord.Outcome.ERROR,
            latency_ms=int((time.monotonic() - started) * 1000),
        )
        # Booked even when the turn is cancelled meanwhile: the provider may have billed it.
        await asyncio.shield(hop(
            call_book, hold=hold, usage=usage, facts=facts, error=error, streamed=bool(parts), content="".join(parts),
        ))
    if error is not None:
        logger.info("route %r: the grading call failed (%s); not graded", call.route, error)
        return None
    return label_of("".join(parts))
