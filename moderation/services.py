"""Moderation: a tenant's policy, one combined check per text, and the review queue.

How `moderate()` combines the checks
------------------------------------
1. No policy, a direction the policy does not check, or blank text: clear, nothing runs.
2. The tenant's rules first (blocked terms, then patterns): no I/O, no cost. A hit trips the
   check, and the provider is not called.
3. Otherwise, if the policy uses the provider: one `/v1/moderations` call
   (`omni-moderation-latest`). A flagged category that counts (`provider_categories`, or any
   when empty) trips the check.
4. Either one tripping trips. The action is the policy's for that direction: `block` gives
   `Verdict.blocked`; `flag` allows the text. Every trip is `Verdict.flagged` and writes one
   ModerationEvent (the excerpt, the categories, what matched, the action) for review.
5. The provider failing fails OPEN, in both directions: the text is allowed (the rules have
   already run), a warning is logged (tenant, direction, error code; never the text), no
   ModerationEvent is written (the review queue is for content, not outages), and
   `Verdict.provider_error` carries the code for the caller's metrics. A provider outage must
   not take every tenant's chat down with it; a tenant that needs fail-closed moderation
   should rely on rules for the must-block cases.

Billing: every provider call is one UsageRecord of kind `moderation` (model
`omni-moderation-latest`, prompt tokens counted with tiktoken because the endpoint reports no
usage, cost from the price table: $0 as installed by moderation's migration). It draws on the
caps like any call: the worst case is reserved before the call and settled after, with the
ledger row in the same transaction. At $0 the worst case is $0, and a $0 reservation refused by
a cap already spent past its limit (possible after an admin lowers it) is admitted without a
hold: the call cannot raise spend, so no cap is breached, and the text is still checked. If an
admin prices the model and the call does not fit, it is not made (fail open,
`provider_error="spending_cap_exceeded"`); a missing price is `provider_error="price_missing"`.
A failed call is billed too (outcome `error`; no tokens when the provider answered an error
status, our count otherwise), a cancelled one with outcome `cancelled`.

`moderate` is async and reaches the database only through `database_sync_to_async`: no hop at
all for a clear rules-only check, one for a rules hit, two around a provider call.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from billing.caps import CapExceeded, Subject
from billing.metering import CallFacts, Hold, call_book, call_hold
from billing.models import ModelPrice, UsageRecord
from billing.services import PriceMissing, price_for
from config.db import database_sync_to_async
from llm.gateway import ProviderTarget, UpstreamError
from llm.moderation import MODERATION_MODEL, provider_check
from llm.tokens import count_text

from .models import Action, ModerationEvent, ModerationPolicy
from .rules import FLAGS, PolicySnapshot, RuleHit, rules_check, terms_compile

logger = logging.getLogger(__name__)

Direction = Literal["input", "output"]
EXCERPT_CHARS = 500
# Longer texts meet tenant patterns in a worker thread: `re` cannot be interrupted, and a slow
# (if bounded) search must not stall every socket on the event loop.
RULES_INLINE_CHARS = 2048
EDITABLE_FIELDS = frozenset({
    "check_input", "check_output", "use_provider", "provider_categories", "blocked_terms",
    "blocked_patterns", "input_action", "output_action", "stream_check_sentences", "notice",
})


class EventNotFound(Exception):
    """No such moderation event in this tenant (a foreign one is reported the same way)."""


@dataclass(frozen=True)
class ModerationContext:
    """Where the checked text belongs, recorded on the event and the usage record."""

    conversation_id: uuid.UUID | None = None
    message_id: uuid.UUID | None = None


@dataclass(frozen=True)
class Verdict:
    """`flagged`: a check tripped (always recorded as an event); `blocked`: and the policy's
    action for this direction is block. `provider_error`: the policy wanted the provider but got
    no answer from it (the error code); the check fell open after the rules had run."""

    blocked: bool = False
    flagged: bool = False
    categories: tuple[str, ...] = ()
    source: str | None = None  # "rules" | "provider"
    event_id: uuid.UUID | None = None
    provider_error: str | None = None


CLEAR = Verdict()


@dataclass(frozen=True)
class Trip:
    """A check that tripped: what its ModerationEvent records."""

    direction: Direction
    source: str
    categories: tuple[str, ...]
    matched: str
    action: str
    excerpt: str

    @classmethod
    def of(cls, *, policy: PolicySnapshot, direction: Direction, text: str, source: str,
           categories: tuple[str, ...], matched: str) -> Trip:
        return cls(direction=direction, source=source, categories=categories, matched=matched,
                   action=policy.action_for(direction), excerpt=text[:EXCERPT_CHARS])

    def verdict(self, event_id: uuid.UUID | None) -> Verdict:
        return Verdict(blocked=self.action == Action.BLOCK, flagged=True, categories=self.categories,
                       source=self.source, event_id=event_id)


# --- policy -------------------------------------------------------------------------------


def policy_snapshot(policy: ModerationPolicy) -> PolicySnapshot:
    """Compile a stored policy. A pattern that no longer compiles (written around the save
    service) is skipped and logged rather than breaking every check of the tenant."""
    patterns = []
    for source in policy.blocked_patterns or []:
        try:
            patterns.append(re.compile(source, FLAGS))
        except Exception:  # noqa: BLE001 — re.error, or a non-string that slipped in
            logger.error("moderation policy of tenant %s: skipping invalid pattern", policy.tenant_id)
    terms = tuple(term for term in policy.blocked_terms or [] if isinstance(term, str) and term.strip())
    return PolicySnapshot(
        tenant_id=policy.tenant_id,
        check_input=policy.check_input,
        check_output=policy.check_output,
        use_provider=policy.use_provider,
        provider_categories=frozenset(policy.provider_categories or []),
        terms=terms,
        patterns=tuple(patterns),
        input_action=policy.input_action,
        output_action=policy.output_action,
        stream_check_sentences=policy.stream_check_sentences,
        notice=policy.notice,
        term_regex=terms_compile(terms),
    )


def policy_for(*, tenant_id: int) -> PolicySnapshot | None:
    """The tenant's policy, compiled; None when it has none (nothing is checked). One query."""
    policy = ModerationPolicy.objects.for_tenant(tenant_id).first()
    return None if policy is None else policy_snapshot(policy)


def policy_save(*, tenant_id: int, **changes: Any) -> ModerationPolicy:
    """Create or change the tenant's policy; terms, patterns and categories are validated
    (patterns must compile and must not nest variable-length quantifiers). Raises ValidationError."""
    unknown = sorted(set(changes) - EDITABLE_FIELDS)
    if unknown:
        raise ValidationError(f"unknown policy fields: {', '.join(unknown)}")
    with transaction.atomic():
        policy, _ = ModerationPolicy.objects.select_for_update().get_or_create(tenant_id=tenant_id)
        for name, value in changes.items():
            setattr(policy, name, value)
        policy.full_clean(exclude=["tenant"])
        policy.save()
    return policy


# --- events -------------------------------------------------------------------------------


def event_record(*, trip: Trip, subject: Subject, context: ModerationContext) -> ModerationEvent:
    return ModerationEvent.objects.create(
        tenant_id=subject.tenant_id,
        direction=trip.direction,
        source=trip.source,
        categories=list(trip.categories),
        matched=trip.matched,
        action=trip.action,
        conversation_id=context.conversation_id,
        message_id=context.message_id,
        end_user_id=subject.end_user_id,
        excerpt=trip.excerpt,
    )


def event_review(*, event_id: uuid.UUID, tenant_id: int, user: Any) -> None:
    """Mark an event reviewed. The first review is kept (who and when); reviewing again is a
    no-op. Raises EventNotFound for a missing or foreign event."""
    events = ModerationEvent.objects.for_tenant(tenant_id)
    try:
        marked = events.filter(pk=event_id, reviewed=False).update(
            reviewed=True, reviewed_by=user, reviewed_at=timezone.now()
        )
        if not marked and not events.filter(pk=event_id).exists():
            raise EventNotFound(str(event_id))
    except (ValidationError, ValueError):  # not a UUID: as missing
        raise EventNotFound(str(event_id)) from None


# --- the provider call, billed ------------------------------------------------------------


def provider_call_open(*, subject: Subject, text: str) -> Hold:
    """Price the call and hold its worst case (billing.metering). Raises PriceMissing, and
    CapExceeded for a priced call that does not fit (a $0 one is admitted without a hold)."""
    price = price_for(MODERATION_MODEL, kind=ModelPrice.Kind.MODERATION, tenant_id=subject.tenant_id)
    with transaction.atomic():
        return call_hold(
            subject=subject, price=price, model=MODERATION_MODEL, prompt_tokens=count_text(text, MODERATION_MODEL),
            max_tokens=0, call_id=f"mod-{uuid.uuid4()}",
        )


def provider_call_close(
    *, call: Hold, subject: Subject, context: ModerationContext, outcome: str, latency_ms: int,
    error: BaseException | None = None, trip: Trip | None = None,
) -> uuid.UUID | None:
    """The call booked (the endpoint reports no usage: tiktoken counted its input; a refusal
    books $0) and, when the check tripped, the event — in one transaction."""
    with transaction.atomic():
        call_book(
            hold=call, usage=None, error=error,
            facts=CallFacts(
                kind=UsageRecord.Kind.MODERATION, outcome=outcome, conversation_id=context.conversation_id,
                message_id=context.message_id, latency_ms=latency_ms,
            ),
        )
        return event_record(trip=trip, subject=subject, context=context).pk if trip else None


# --- the combined check -------------------------------------------------------------------


async def _rules(policy: PolicySnapshot, text: str) -> RuleHit | None:
    if policy.patterns and len(text) > RULES_INLINE_CHARS:
        return await asyncio.to_thread(rules_check, policy=policy, text=text)
    return rules_check(policy=policy, text=text)


def _fell_open(policy: PolicySnapshot, direction: Direction, code: str) -> Verdict:
    logger.warning(
        "moderation fell open: tenant %s, %s checked without the provider (%s)", policy.tenant_id, direction, code
    )
    return Verdict(provider_error=code)


async def moderate(
    *, policy: PolicySnapshot | None, direction: Direction, text: str, target: ProviderTarget | None,
    subject: Subject, context: ModerationContext,
) -> Verdict:
    """Check `text` as the module docstring describes. Never raises for a provider failure."""
    if direction not in ("input", "output"):
        raise ValueError(f"unknown moderation direction {direction!r}")
    if policy is None or not policy.checks(direction) or not text.strip():
        return CLEAR
    hit = await _rules(policy, text)
    if hit is not None:
        trip = Trip.of(policy=policy, direction=direction, text=text, source=ModerationEvent.Source.RULES,
                       categories=(hit.category,), matched=hit.matched)
        event = await database_sync_to_async(event_record)(trip=trip, subject=subject, context=context)
        return trip.verdict(event.pk)
    if not policy.use_provider:
        return CLEAR
    if target is None:
        return _fell_open(policy, direction, "no_provider")
    return await _provider_moderate(
        policy=policy, direction=direction, text=text, target=target, subject=subject, context=context
    )


async def _provider_moderate(
    *, policy: PolicySnapshot, direction: Direction, text: str, target: ProviderTarget, subject: Subject,
    context: ModerationContext,
) -> Verdict:
    try:
        call = await database_sync_to_async(provider_call_open)(subject=subject, text=text)
    except PriceMissing:
        return _fell_open(policy, direction, "price_missing")
    except CapExceeded:
        return _fell_open(policy, direction, "spending_cap_exceeded")
    close = database_sync_to_async(provider_call_close)
    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        result = await provider_check(target=target, texts=[text], categories=policy.provider_categories)
    except UpstreamError as error:
        # A refusal processed nothing; a timeout or a cut connection may have: our count.
        await close(call=call, subject=subject, context=context, outcome=UsageRecord.Outcome.ERROR,
                    error=error, latency_ms=elapsed())
        return _fell_open(policy, direction, error.code)
    except asyncio.CancelledError:
        await asyncio.shield(close(call=call, subject=subject, context=context, outcome=UsageRecord.Outcome.CANCELLED,
                                   latency_ms=elapsed()))
        raise
    trip = None
    if result.flagged:
        trip = Trip.of(policy=policy, direction=direction, text=text, source=ModerationEvent.Source.PROVIDER,
                       categories=result.categories, matched=", ".join(result.categories))
    event_id = await close(call=call, subject=subject, context=context, outcome=UsageRecord.Outcome.OK,
                           latency_ms=elapsed(), trip=trip)
    return CLEAR if trip is None else trip.verdict(event_id)

