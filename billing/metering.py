"""Metering: the one primitive every upstream call goes through — hold its worst case, make the
call, book what it cost.

Chat rounds, `/v1`, summaries and moderation all call `call_hold` (or `call_hold_async` on an
event loop) before the provider and `call_book` after it; a call that never reached the
provider gives its hold back with `call_release`. Nothing outside `billing/` reserves, settles,
books a lease or writes a UsageRecord (tests/test_metering.py holds that by reading the source).

The money rules, once:
- the hold is the worst case: the prompt at the full input price, with a margin, plus every
  output token the call may produce (`worst_case_cost`); a call whose worst case is $0 is
  admitted without a hold, as it cannot raise spend;
- a provider that refused the request (an error status before anything streamed) billed
  nothing: the call books $0;
- otherwise the call is billed from the provider's usage when it sent one (cached input at its
  own price), else from our count: the prompt we sent and, with tiktoken, what streamed;
- one UsageRecord per call, keyed by the call id: a retried booking never bills twice.

A hold is an exact reservation (one conditional UPDATE per cap) or, on a web process's event
loop, a draw on that process's cap leases (no database trip); `call_hold_async` chooses.
"""

from __future__ import annotations

import contextlib
import functools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction

from llm.gateway import UpstreamError, Usage
from llm.tokens import count_text

from .caps import CapExceeded, Subject, cap_hold, cap_reserve, cap_settle
from .leases import Draw, lease_book, leases
from .models import Reservation, SpendingCap, UsageRecord
from .processes import process_alive
from .services import Price, UsageInput, usage_record

Hop = Callable[..., Awaitable[Any]]  # runs a synchronous database function off the event loop
Caps = list[tuple[SpendingCap, str]]

NOTHING_BILLED = Usage(prompt_tokens=0, completion_tokens=0, cached_tokens=0)


def worst_case_cost(*, price: Price, prompt_tokens: int, max_tokens: int) -> Decimal:
    """Prompt at the full input price (no cache discount assumed) plus every allowed output
    token, with a margin for the provider counting the prompt a little differently."""
    margin = 1 + settings.RESERVATION_PROMPT_MARGIN
    return price.cost(prompt_tokens=int(prompt_tokens * margin) + 16, completion_tokens=max_tokens)


@dataclass(frozen=True)
class Hold:
    """One upstream call's worst case, held against the caps until the call is booked."""

    call_id: str
    subject: Subject
    model: str
    price: Price
    prompt_tokens: int  # our count of the prompt: what is billed when the provider sends no usage
    amount: Decimal
    reservation: Reservation | None = None  # an exact hold, or
    draw: Draw | None = None  # what the call took from this process's leases
    process_id: uuid.UUID | None = None  # the web process whose death settles it (billing/processes.py)

    @property
    def reservation_id(self) -> uuid.UUID | None:
        """The stored exact reservation, if any (one with no cap holds nothing and is not stored)."""
        reservation = self.reservation
        return reservation.pk if reservation is not None and reservation.period_ids else None


def _hold(subject: Subject, *, model: str, price: Price, prompt_tokens: int, max_tokens: int, call_id: str,
          process_id: uuid.UUID | None = None) -> Hold:
    amount = worst_case_cost(price=price, prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    return Hold(call_id=call_id, subject=subject, model=model, price=price, prompt_tokens=prompt_tokens,
                amount=amount, process_id=process_id)


def call_hold(
    *, subject: Subject, price: Price, prompt_tokens: int, max_tokens: int, call_id: str, model: str | None = None,
    caps: Caps | None = None,
) -> Hold:
    """Reserve the call's worst case against every cap that applies, in the caller's transaction
    (a refusal rolls it back). `caps`: the applicable caps when the caller already has them (a
    warm turn reads none); otherwise they are read here. Raises CapExceeded — except for a $0
    worst case, admitted without a hold."""
    hold = _hold(subject, model=model or price.model, price=price, prompt_tokens=prompt_tokens,
                 max_tokens=max_tokens, call_id=call_id)

    def reserve() -> Reservation:
        if caps is None:
            return cap_reserve(subject=subject, amount=hold.amount, call_id=call_id)
        return cap_hold(subject=subject, caps=caps, amount=hold.amount, call_id=call_id)

    if hold.amount > 0:
        return replace(hold, reservation=reserve())
    try:
        with transaction.atomic():  # a savepoint: this refusal must not spoil the caller's transaction
            return replace(hold, reservation=reserve())
    except CapExceeded:
        return hold  # free: it cannot raise spend, so a spent cap does not refuse it


async def call_hold_async(
    *, subject: Subject, caps: Caps, price: Price, prompt_tokens: int, max_tokens: int, call_id: str, model: str,
    hop: Hop, leases_ok: bool = True, process_id: uuid.UUID | None = None,
) -> Hold:
    """`call_hold` on an event loop, with the applicable caps already known: from this
    process's leases when they cover the worst case (no database round trip), else reserved
    for this call alone through `hop`. Raises CapExceeded."""
    hold = _hold(subject, model=model, price=price, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                 call_id=call_id, process_id=process_id)
    if not caps:
        return hold  # nothing to hold against
    if leases_ok:
        draw = await leases().draw(subject=subject, caps=caps, amount=hold.amount, hop=hop, process_id=process_id)
        if draw is not None:
            return replace(hold, draw=draw)
    reserve = functools.partial(hop, cap_hold, subject=subject, caps=caps, amount=hold.amount, call_id=call_id,
                                process_id=process_id)
    try:
        return replace(hold, reservation=await reserve())
    except CapExceeded:
        # Budget parked in this process's idle leases must not be what refuses the call.
        if not await leases().release_idle(caps, hop):
            raise
        return replace(hold, reservation=await reserve())


def provider_refused(error: BaseException | None, *, streamed: bool) -> bool:
    """The provider answered the request with an error status (a 4xx, or a 5xx of its own)
    before anything streamed: it refused the request and billed nothing."""
    return not streamed and isinstance(error, UpstreamError) and error.status is not None


def usage_billed(*, usage: Usage | None, error: BaseException | None, streamed: bool) -> Usage | None:
    """What a finished or failed call is billed for: the provider's usage when it sent one;
    nothing when it refused the request; otherwise None — counted by `call_book` (a timeout,
    a cut stream, a client that left)."""
    if usage is not None:
        return usage
    return NOTHING_BILLED if provider_refused(error, streamed=streamed) else None


@dataclass(frozen=True)
class CallFacts:
    """What the ledger row says about a call besides its tokens."""

    kind: str = UsageRecord.Kind.CHAT
    outcome: str = UsageRecord.Outcome.OK
    conversation_id: uuid.UUID | None = None
    message_id: uuid.UUID | None = None
    latency_ms: int | None = None
    ttft_ms: int | None = None
    # The levers (routing, response cache, batch) say what they did and saved against the
    # list price of the model asked for; the cached-input saving is computed from the tokens.
    requested_model: str = ""
    route: str = ""
    saved_response_cache_usd: Decimal = Decimal(0)
    saved_routing_usd: Decimal = Decimal(0)
    saved_batch_usd: Decimal = Decimal(0)
    # Routing chose the call's model: the requested model's list price measures what it saved.
    requested_price: Price | None = None


def call_book(
    *, hold: Hold, usage: Usage | None, facts: CallFacts, error: BaseException | None = None,
    streamed: bool = False, content: str = "", prompt_tokens: int | None = None,
) -> UsageRecord:
    """Write the call's one UsageRecord and settle its hold to the cost, once (idempotent on the
    call id). `usage`: the provider's, or None; `content`: what streamed, counted when it sent
    none; `prompt_tokens`: our count of the prompt when it differs from the hold's.
    A leased call's record and its booking commit together (the ledger and the counters never
    disagree); a call whose web process was taken for dead books nothing the sweep booked."""
    billed = usage_billed(usage=usage, error=error, streamed=streamed)
    leased = hold.draw.leases if hold.draw is not None else ()
    with transaction.atomic() if leased or hold.process_id else contextlib.nullcontext():
        if hold.process_id is not None and not process_alive(hold.process_id):
            swept = _swept_record(hold)
            if swept is not None:
                return swept
        record = usage_record(usage=_usage_input(hold, billed, facts, content, prompt_tokens), price=hold.price)
        for lease in leased:
            lease_book(reservation_id=lease.reservation_id, period_id=lease.period_id, actual=record.cost_usd)
    if hold.reservation is not None:
        # Its own short statement: should the process die here, the stale-reservation sweep
        # settles the hold from the record just written.
        cap_settle(reservation=hold.reservation, actual=record.cost_usd)
    return record


def _usage_input(
    hold: Hold, billed: Usage | None, facts: CallFacts, content: str, prompt_tokens: int | None
) -> UsageInput:
    subject = hold.subject
    return UsageInput(
        call_id=hold.call_id, tenant_id=subject.tenant_id, model=hold.model,
        prompt_tokens=billed.prompt_tokens if billed else (hold.prompt_tokens if prompt_tokens is None else prompt_tokens),
        completion_tokens=billed.completion_tokens if billed else count_text(content, hold.model),
        cached_tokens=billed.cached_tokens if billed else 0,
        estimated=billed is None,
        kind=facts.kind, outcome=facts.outcome,
        end_user_id=subject.end_user_id, api_key_id=subject.api_key_id,
        conversation_id=facts.conversation_id, message_id=facts.message_id,
        latency_ms=facts.latency_ms, ttft_ms=facts.ttft_ms,
        requested_model=facts.requested_model, route=facts.route,
        saved_response_cache_usd=facts.saved_response_cache_usd, saved_routing_usd=facts.saved_routing_usd,
        saved_batch_usd=facts.saved_batch_usd, requested_price=facts.requested_price,
        lease_ids=tuple(str(lease.reservation_id) for lease in hold.draw.leases) if hold.draw else (),
    )


def _swept_record(hold: Hold) -> UsageRecord | None:
    """What stands for the call when the sweep took its process for dead: the record the sweep
    booked from its checkpoint, or — its exact reservation settled (at zero: admitted after
    the last beat) — an unsaved record of nothing, as booking it now would not match its
    settled hold. None: the sweep never saw the call (admitted after it), which books as usual."""
    record = UsageRecord.objects.filter(call_id=hold.call_id).first()
    if record is not None:
        return record
    reservation_id = hold.reservation_id
    if reservation_id is not None and not Reservation.objects.filter(
        pk=reservation_id, status=Reservation.Status.HELD
    ).exists():
        return UsageRecord(call_id=hold.call_id, cost_usd=Decimal(0))
    return None


def answer_cached_book(
    *, subject: Subject, call_id: str, model: str, price: Price, prompt_tokens: int, completion_tokens: int,
    facts: CallFacts,
) -> UsageRecord:
    """A response-cache hit: no upstream call and nothing held, yet one ledger row (kind
    `cached`, $0) with the tokens the call would have had and their list cost as the saving.
    Idempotent on the call id."""
    saved = price.cost(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    free = replace(price, input=Decimal(0), cached_input=Decimal(0), output=Decimal(0))
    return usage_record(usage=UsageInput(
        call_id=call_id, tenant_id=subject.tenant_id, model=model, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, kind=UsageRecord.Kind.CACHED, outcome=facts.outcome,
        end_user_id=subject.end_user_id, api_key_id=subject.api_key_id, conversation_id=facts.conversation_id,
        message_id=facts.message_id, latency_ms=facts.latency_ms, ttft_ms=facts.ttft_ms,
        saved_response_cache_usd=saved,
    ), price=free)


def call_release(hold: Hold) -> None:
    """Give an exact hold back untouched: its call never reached the provider (nothing is
    recorded). Leased holds go back on their loop: `call_release_async`."""
    if hold.reservation is not None:
        cap_settle(reservation=hold.reservation, actual=Decimal(0))


async def call_release_async(hold: Hold, *, hop: Hop) -> None:
    """`call_release` on the event loop, leased holds included."""
    call_returned(hold, actual=Decimal(0), hop=hop)
    if hold.reservation is not None:
        await hop(cap_settle, reservation=hold.reservation, actual=Decimal(0))


def call_returned(hold: Hold, *, actual: Decimal | None, hop: Hop) -> None:
    """On the loop, once a leased call is booked: the unspent rest of its worst case goes back
    to its leases. `actual` None — the booking failed — returns nothing (the worst case stays
    held until the lease is released)."""
    if hold.draw is not None:
        leases().settled(hold.draw, actual=actual, hop=hop)


def holds_close_tenant(tenant_id: int, *, hop: Hop) -> None:
    """The tenant's configuration changed (a cap edited, deleted…): this process's leases of
    its caps admit no more calls, and are given back once their calls are booked."""
    leases().close_tenant(tenant_id, hop)


async def holds_release_all(*, hop: Hop) -> None:
    """Shutdown, or the process was taken for dead: give back every lease of this event loop
    (the ones calls still draw on go back once those are booked)."""
    await leases().release_all(hop)


def call_rehold(
    *, call_id: str, subject: Subject, model: str, price: Price, prompt_tokens: int
) -> Hold:
    """A call's hold as stored, for a sweep that books the call of a process that died."""
    reservation = Reservation.objects.filter(call_id=call_id).first()
    return Hold(call_id=call_id, subject=subject, model=model, price=price, prompt_tokens=prompt_tokens,
                amount=reservation.amount_usd if reservation else Decimal(0), reservation=reservation)


def calls_release(*, call_id_prefix: str) -> int:
    """Settle at zero every hold still held whose call id starts with the prefix: calls a dead
    process reserved and never made. Returns how many."""
    released = 0
    for held in Reservation.objects.filter(call_id__startswith=call_id_prefix, status=Reservation.Status.HELD):
        released += cap_settle(reservation=held, actual=Decimal(0))
    return released
