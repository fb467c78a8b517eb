"""A cacheable turn and the response cache (responsecache/): a hit streams the stored answer
through the same events as a generated one, ending with `message.completed` marked `cached`;
a miss keeps the answer once it is complete."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from config.db import database_sync_to_async
from responsecache.chat import Lookup, answer_lookup, answer_pieces, answer_remember
from routing.rules import GradeNeeded
from tenants.callers import Caller

from .answers import TurnOutcome, TurnResult, turn_cached
from .models import Message
from .turns import Resume, TurnPlan

Prepare = Callable[..., Awaitable[TurnPlan]]


def cache_before_grading(prepare: Prepare, *, caller: Caller, question: str) -> Prepare:
    """`prepare` (`turns.turn_prepare` on a database hop) for `routing.selection.with_grades`,
    asking the response cache before a classifier route's grading call: a question the cache
    answers costs no grading call (no route is chosen: the message names the model that wrote
    the stored answer), and a miss's lookup, embedding included, goes on to the generation.
    The lookup's embedding is booked to the conversation the turn opens or continues."""
    lookup: Lookup | None = None

    async def prepare_cached(*, grades: Any, resume: Any) -> TurnPlan:
        nonlocal lookup
        try:
            return await prepare(grades=grades, resume=resume, cached=lookup)
        except GradeNeeded as needed:
            scope = needed.resume.cache if isinstance(needed.resume, Resume) else None
            if lookup is not None or scope is None or needed.call is None:
                raise
            lookup = await answer_lookup(scope, question=question, target=needed.call.target, subject=caller,
                                         conversation_id=needed.resume.admission.conversation_id)
            if lookup is None or lookup.hit is None:
                raise  # graded next, then prepared again with this lookup
            return await prepare(grades=grades, resume=needed.resume, cached=lookup)

    return prepare_cached


class CachedTurn:
    """One turn's use of the response cache (nothing, when the turn is not cacheable)."""

    def __init__(self, plan: TurnPlan) -> None:
        self.plan = plan
        self.lookup: Lookup | None = None

    async def served(self, subject: Any, log: Any, spent: Any) -> bool:
        """Look the question up. On a hit the stored answer is published as deltas, stored and
        booked ($0, the saving on the ledger), and True: no model is called."""
        plan = self.plan
        if plan.response_cache is None:
            return False
        self.lookup = plan.cache_lookup or await answer_lookup(
            plan.response_cache, question=plan.user_content, target=plan.target, subject=subject,
            conversation_id=plan.conversation_id,
        )
        hit = self.lookup.hit if self.lookup is not None else None
        if hit is None:
            return False
        for piece in answer_pieces(hit.answer):
            await log.delta(piece, round_parts=[])
        result = await database_sync_to_async(turn_cached)(plan=plan, hit=hit)
        completed = spent.completed(message_id=str(plan.assistant_message_id), finish_reason=hit.finish_reason, last=result)
        await log.publish(replace(completed, cached=True))
        return True

    async def keep(self, outcome: TurnOutcome, result: TurnResult, *, rounds: int) -> None:
        """After a miss: keep the answer if the model completed it in one call (not cut, failed
        or blocked)."""
        if self.lookup is None or outcome.status != Message.Status.COMPLETE or rounds:
            return
        await answer_remember(self.lookup, answer=outcome.content, model=self.plan.model, prompt_tokens=result.prompt_tokens,
                              completion_tokens=result.completion_tokens, finish_reason=outcome.finish_reason)
