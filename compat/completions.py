"""The stateless OpenAI-compatible call: who may use which model, what goes upstream, what is billed.

Nothing of the conversation is stored: the caller's messages are the prompt, and the only
write is the UsageRecord of the call. Everything before the upstream call is
`completion_admit`, on the event loop: the caller's configuration from the process cache
(`conversations.admission`), the rate limits and the configuration versions in one Redis round trip, and — when
a cap applies — the reservation, the one database hop before the first token. Everything after
the call is `completion_settle`, on a database thread, after the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import transaction

from billing.caps import CapExceeded, Subject, cap_hold, cap_settle
from billing.leases import Draw, lease_book, leases
from billing.models import ModelPrice, Reservation, UsageRecord
from billing.processes import process_alive
from billing.services import Price, UsageInput, usage_record
from compat import v1_liveness
from conversations.admission import (
    EndUserAccess,
    EndUserBlocked,
    KeyConfig,
    ModelNotAvailable,
    access_load,
    cached_end_user,
    cached_key,
    cached_price,
    end_user_load,
    price_load,
)
from conversations.errors import InvalidInput, ModerationBlocked
from conversations.lifecycle import DEFAULT_END_USER
from conversations.protocol import InvalidFrame, json_parse
from conversations.turns import worst_case_cost
from llm import relay
from llm.gateway import ProviderTarget, Usage
from llm.tokens import PROMPT_FIELDS, UncountableContent, count_request_prompt, count_text
from moderation.gate import OutputGate
from moderation.rules import PolicySnapshot
from moderation.services import ModerationContext, moderate
from tenants import ratelimits
from tenants.authentication import api_key_from_authorization, api_key_touch_by_id, bearer_token
from tenants.freshness import versions_parse, versions_read, versions_stored_keys
from tenants.services import InvalidApiKey, api_key_prefix, end_user_hash

__all__ = ["EndUserBlocked", "ModelNotAvailable"]  # raised from here; defined with the admission cache

MAX_USER_CHARS = 200


class InvalidRequest(InvalidInput):
    """A malformed request body; `param` names the offending field, as OpenAI does."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# --- the request --------------------------------------------------------------------------


# The largest output a request may ask for (an Assistant's own bound); past it a worst case
# is no longer a price (10**30 tokens overflowed the cost's Decimal: a 500).
MAX_OUTPUT_TOKENS = 2**31 - 1
# OpenAI's own bound on `n`; the hold is the output bound times n, so n needs one too.
MAX_CHOICES = 128


def _positive_int(body: dict[str, Any], name: str, *, most: int = MAX_OUTPUT_TOKENS) -> None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
        raise InvalidRequest(f"'{name}' must be an integer from 1 to {most}", param=name)


def completion_request_parse(raw: bytes) -> dict[str, Any]:
    """The request body, checked only as far as we rely on it; the provider checks the rest
    (roles, tools, response_format…) and its 400 reaches the caller. Raises InvalidRequest."""
    try:
        body = json_parse(raw)
    except InvalidFrame as error:
        raise InvalidRequest(f"the request body is not usable: {error}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("'model' is required", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("'messages' must be a non-empty array of message objects", param="messages")
    if not isinstance(body.get("stream", False), bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    _positive_int(body, "n", most=MAX_CHOICES)
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not user or len(user) > MAX_USER_CHARS):
        raise InvalidRequest(f"'user' must be a non-empty string of at most {MAX_USER_CHARS} characters", param="user")
    return body


# --- before the call ----------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionPlan:
    call_id: str
    tenant_id: int
    api_key_id: int
    end_user_id: uuid.UUID
    model: str
    price: Price
    target: ProviderTarget
    upstream_body: bytes
    prompt_tokens: int  # our count of the prompt: what is billed when the provider sends no usage
    stream: bool
    forward_usage: bool  # the caller asked for stream_options.include_usage
    reservation: Reservation | None = None  # an exact hold, or
    draw: Draw | None = None  # what the call took from this process's leases
    process_id: uuid.UUID | None = None  # the web process whose death settles those (v1_liveness)
    limits: tuple[ratelimits.LimitState, ...] = ()  # after this call was counted: for headers
    moderation: PolicySnapshot | None = None  # the tenant's content policy, for the answer

    @property
    def output_checked(self) -> bool:
        return self.moderation is not None and self.moderation.check_output

    @property
    def sentence_checked(self) -> bool:
        """A stream's answer is checked sentence by sentence, each held back until it passes."""
        return self.output_checked and bool(self.moderation and self.moderation.stream_check_sentences)


def upstream_body(request: dict[str, Any], *, user_hash: str, default_max_tokens: int) -> bytes:
    """The caller's request with what we always send: a hashed `user`, a `max_tokens`, and,
    when streaming, `stream_options.include_usage` (usage is how the call is billed)."""
    body = dict(request)
    body["user"] = user_hash
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = default_max_tokens
    if body.get("stream"):
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


Hop = Callable[..., Awaitable[Any]]  # runs a synchronous database function off the event loop

# Prompts longer than this are counted on a thread: tiktoken holds the loop otherwise.
COUNT_ON_LOOP_CHARS = 16_000


async def completion_admit(*, authorization: str, request: dict[str, Any], hop: Hop) -> CompletionPlan:
    """Authenticate, check the model and the end user, count the rate limits and reserve the
    worst case against the caps. Raises InvalidApiKey, ModelNotAvailable, EndUserBlocked,
    RateLimited, CapExceeded, InvalidInput / NotFound (no credential or default assistant)."""
    token = bearer_token(authorization)
    if token is None:
        raise InvalidApiKey("missing bearer API key")
    prefix = api_key_prefix(token)
    model = request["model"]
    external_id = request.get("user") or DEFAULT_END_USER

    access, end_user, price = await _caller(prefix=prefix, token=token, external_id=external_id, model=model, hop=hop)
    price = _admissible(access, end_user=end_user, price=price, model=model)
    prompt_tokens = await _prompt_tokens(request, model)
    _, default_max_tokens = access.defaults()

    # One Redis round trip: every rate limit, and the versions the cached configuration needs.
    tokens = prompt_tokens + output_bound(request, default_max_tokens=default_max_tokens)
    checks = ratelimits.checks_for(access.caller(end_user.id), access.limits, tokens=tokens)
    acquired = await ratelimits.rate_limits_acquire_async(checks, also_read=versions_stored_keys(access.tenant_id))
    # Embedded mode reads nothing from Redis: its versions are in this process's memory.
    versions = versions_parse(acquired.read) if acquired.read else versions_read(access.tenant_id)
    if versions != access.versions:  # changed since cached: judge the call again on fresh rows
        leases().close_tenant(access.tenant_id, hop)
        loaded = await hop(access_load, prefix=prefix, token=token, external_id=external_id, model=model)
        access, end_user = loaded.access, loaded.end_user
        price = _admissible(access, end_user=end_user, price=loaded.price, model=model)
    target, default_max_tokens = access.defaults()

    call_id = f"cmpl-{uuid.uuid4()}"
    subject = access.caller(end_user.id)
    caps = access.tenant.caps_for(subject)
    await _input_check(access.moderation, request["messages"], target=target, subject=subject)
    amount = worst_case_cost(
        price=price, prompt_tokens=prompt_tokens, max_tokens=output_bound(request, default_max_tokens=default_max_tokens)
    )
    # A hold carries this process's id: should it die, the process sweep settles the hold.
    process_id = await v1_liveness.process_id(hop) if caps else None
    reservation, draw = await _hold(
        subject=subject, caps=caps, amount=amount, call_id=call_id, hop=hop, process_id=process_id
    )
    try:
        stream = bool(request.get("stream"))
        return CompletionPlan(
            call_id=call_id,
            tenant_id=access.tenant_id,
            api_key_id=access.key_id,
            end_user_id=end_user.id,
            model=model,
            price=price,
            target=target,
            upstream_body=upstream_body(
                request,
                user_hash=end_user_hash(tenant_id=access.tenant_id, end_user_id=end_user.id),
                default_max_tokens=default_max_tokens,
            ),
            prompt_tokens=prompt_tokens,
            stream=stream,
            forward_usage=stream and bool((request.get("stream_options") or {}).get("include_usage")),
            reservation=reservation,
            draw=draw,
            process_id=process_id,
            limits=acquired.states,
            moderation=access.moderation,
        )
    except BaseException:
        await asyncio.shield(hold_release(reservation=reservation, draw=draw, hop=hop))
        raise


def output_bound(request: dict[str, Any], *, default_max_tokens: int) -> int:
    """The most output the provider may produce and bill: the larger of `max_tokens` and
    `max_completion_tokens` (a provider honours either), the default when neither is given,
    for each of the `n` answers asked for."""
    given = [request.get(name) for name in ("max_tokens", "max_completion_tokens")]
    largest = max((value for value in given if value is not None), default=default_max_tokens)
    return largest * (request.get("n") or 1)


async def hold_release(*, reservation: Reservation | None, draw: Draw | None, hop: Hop) -> None:
    """Give a hold back untouched: the call it was for never reached the provider (nothing
    was generated and nothing is recorded)."""
    if draw is not None:
        leases().settled(draw, actual=Decimal(0), hop=hop)
    if reservation is not None:
        await hop(cap_settle, reservation=reservation, actual=Decimal(0))


def user_text(messages: list[dict[str, Any]]) -> str:
    """What the caller's end user wrote: the text of every `user` message (strings and text
    parts), for the tenant's input policy. System and assistant turns are the integrator's."""
    parts: list[str] = []
    for message in messages:
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [str(part.get("text") or "") for part in content if isinstance(part, dict) and part.get("type") == "text"]
    return "\n".join(parts)


async def _input_check(policy: PolicySnapshot | None, messages: list[dict[str, Any]], *, target: ProviderTarget,
                       subject: Subject) -> None:
    """The tenant's input policy, before anything is reserved or sent. Raises ModerationBlocked."""
    if policy is None or not policy.check_input:
        return
    verdict = await moderate(
        policy=policy, direction="input", text=user_text(messages), target=target, subject=subject,
        context=ModerationContext(),
    )
    if verdict.blocked:
        raise ModerationBlocked("this message was blocked by the content policy")


def completion_output_gate(plan: CompletionPlan) -> OutputGate:
    """The tenant's output policy for this call's answer (moderation/gate.py, shared with chat)."""
    return OutputGate(
        policy=plan.moderation, target=plan.target, subject=Subject(plan.tenant_id, plan.end_user_id, plan.api_key_id),
    )


def _blocked_error(plan: CompletionPlan) -> ModerationBlocked:
    notice = plan.moderation.notice if plan.moderation else ""
    return ModerationBlocked(notice or "the answer was blocked by the content policy")


async def completion_output_check(plan: CompletionPlan, text: str) -> ModerationBlocked | None:
    """The tenant's output policy on a whole answer: the error to answer with instead, or None."""
    if not plan.output_checked or not await completion_output_gate(plan).blocks(text):
        return None
    return _blocked_error(plan)


class SentenceGate:
    """Holds a relayed stream's events back until the text they carry has passed the output
    gate, one sentence at a time — the gate sockets use, for bytes that are relayed rather
    than rebuilt. An event goes out once every character up to its end belongs to a checked
    sentence; events without text (the role, the finish reason, usage) go out in their place.
    After a blocked sentence nothing more goes out."""

    def __init__(self, plan: CompletionPlan) -> None:
        self.plan = plan
        self.gate = completion_output_gate(plan)
        self.pending: deque[tuple[int, bytes]] = deque()  # (text offset at the event's end, event)
        self.fed = 0  # characters of answer text seen
        self.checked = 0  # characters of it in sentences that passed
        self.blocked: ModerationBlocked | None = None

    async def feed(self, chunk: bytes) -> bytes:
        """Complete events in (each ending in a blank line); what may go out now, out."""
        for event in chunk.split(b"\n\n"):
            if not event.strip():
                continue
            text = _delta_text(event)
            self.fed += len(text)
            self.pending.append((self.fed, event + b"\n\n"))
            async for sentence in self.gate.passed(text):
                self.checked += len(sentence)
            if self.gate.blocked:
                self.blocked = _blocked_error(self.plan)
                return b""
        return self._release()

    async def finish(self) -> bytes:
        """The stream ended: check the last, unfinished sentence and release the rest."""
        self.checked += len(await self.gate.rest())
        if self.gate.blocked:
            self.blocked = _blocked_error(self.plan)
            return b""
        return self._release()

    def _release(self) -> bytes:
        out = []
        while self.pending and self.pending[0][0] <= self.checked:
            out.append(self.pending.popleft()[1])
        return b"".join(out)


def _delta_text(event: bytes) -> str:
    """The answer text one streamed event carries (every choice's `delta.content`)."""
    return "".join(str(delta.get("content") or "") for delta in relay.event_deltas(event))


async def _caller(
    *, prefix: str, token: str, external_id: str, model: str, hop: Hop
) -> tuple[KeyConfig, EndUserAccess, Price | None]:
    """The key (authenticated), end user and price from this process's cache, loading what it
    lacks. Raises InvalidApiKey before anything about the end user is read or written."""
    access = cached_key(prefix)
    if access is None:
        loaded = await hop(access_load, prefix=prefix, token=token, external_id=external_id, model=model)
        return loaded.access, loaded.end_user, loaded.price
    access.authenticate(token)
    end_user = cached_end_user(access, external_id) or await hop(end_user_load, access=access, external_id=external_id)
    price = cached_price(access, model)
    if price is False:
        price = await hop(price_load, access=access, model=model)
    return access, end_user, price


async def _hold(
    *, subject: Subject, caps: list, amount: Decimal, call_id: str, hop: Hop,
    process_id: uuid.UUID | None = None,
) -> tuple[Reservation | None, Draw | None]:
    """The worst case held against every cap: from this process's leases when they cover it
    (no database round trip), else reserved for this call alone. Raises CapExceeded."""
    if not caps:
        return cap_hold(subject=subject, caps=caps, amount=amount, call_id=call_id), None
    draw = await leases().draw(subject=subject, caps=caps, amount=amount, hop=hop, process_id=process_id)
    if draw is not None:
        return None, draw
    hold = functools.partial(hop, cap_hold, subject=subject, caps=caps, amount=amount, call_id=call_id,
                             process_id=process_id)
    try:
        return await hold(), None
    except CapExceeded:
        # Budget parked in this process's idle leases must not be what refuses the call.
        if not await leases().release_idle(caps, hop):
            raise
        return await hold(), None


def _admissible(access: KeyConfig, *, end_user: EndUserAccess, price: Price | None, model: str) -> Price:
    access.model_check(model)
    if price is None:
        raise ModelNotAvailable(model)
    if end_user.is_blocked:
        raise EndUserBlocked()
    return price


async def _prompt_tokens(request: dict[str, Any], model: str) -> int:
    """The most the request's prompt can be billed for. Raises InvalidRequest for content
    whose cost cannot be bounded (audio, files, unknown part types)."""
    size = sum(len(str(request.get(name) or "")) for name in ("messages", *PROMPT_FIELDS))
    try:
        if size > COUNT_ON_LOOP_CHARS:
            return await asyncio.to_thread(count_request_prompt, request, model)
        return count_request_prompt(request, model)
    except UncountableContent as error:
        raise InvalidRequest(str(error), param="messages") from None


# --- after the call -----------------------------------------------------------------------


def completion_settle(
    *,
    plan: CompletionPlan,
    usage: Usage | None,
    content: str,
    outcome: str,
    latency_ms: int,
    ttft_ms: int | None,
) -> UsageRecord:
    """Write the call's one UsageRecord: the provider's usage, or our own count when it sent
    none (a broken stream, a client that left), then settle the call's reservation to its cost.
    Two short transactions, not one: the cap's row is locked only while it is booked, and a
    process that dies between them leaves a held reservation that the stale-reservation sweep
    settles from this record. Idempotent on the plan's call id.
    A call whose process was taken for dead (billing/processes.py) books nothing the sweep
    booked or settled (`_swept_record`)."""
    leased = plan.draw.leases if plan.draw is not None else ()
    # A leased call's record and its booking commit together: the ledger and the counters it
    # is reconciled with never disagree, even for a moment (the row lock is taken last).
    # A held call's record is written while its process's row is share-locked: the sweep that
    # claims the row waits for it, or has claimed it already.
    with transaction.atomic() if leased or plan.process_id else contextlib.nullcontext():
        if plan.process_id is not None and not process_alive(plan.process_id):
            swept = _swept_record(plan)
            if swept is not None:
                return swept
        record = _record(plan=plan, usage=usage, content=content, outcome=outcome, latency_ms=latency_ms,
                         ttft_ms=ttft_ms)
        for lease in leased:
            lease_book(reservation_id=lease.reservation_id, period_id=lease.period_id, actual=record.cost_usd)
    if plan.reservation is not None:
        cap_settle(reservation=plan.reservation, actual=record.cost_usd)
    api_key_touch_by_id(plan.api_key_id)
    return record


def _swept_record(plan: CompletionPlan) -> UsageRecord | None:
    """What stands for the call when the sweep took its process for dead: the record the sweep
    booked from its checkpoint, or — its exact reservation settled (at zero: admitted after
    the last beat) — an unsaved record of nothing, as booking it now would not match its
    settled hold. None: the sweep never saw the call (admitted after it), which books as usual."""
    record = UsageRecord.objects.filter(call_id=plan.call_id).first()
    if record is not None:
        return record
    reservation = plan.reservation
    if reservation is not None and reservation.period_ids and not Reservation.objects.filter(
        pk=reservation.pk, status=Reservation.Status.HELD
    ).exists():
        return UsageRecord(call_id=plan.call_id, cost_usd=Decimal(0))
    return None


def _record(*, plan: CompletionPlan, usage: Usage | None, content: str, outcome: str, latency_ms: int, ttft_ms: int | None) -> UsageRecord:
    return usage_record(
        usage=UsageInput(
            call_id=plan.call_id,
            tenant_id=plan.tenant_id,
            model=plan.model,
            prompt_tokens=usage.prompt_tokens if usage else plan.prompt_tokens,
            completion_tokens=usage.completion_tokens if usage else count_text(content, plan.model),
            cached_tokens=usage.cached_tokens if usage else 0,
            estimated=usage is None,
            kind=UsageRecord.Kind.COMPLETION,
            outcome=outcome,
            end_user_id=plan.end_user_id,
            api_key_id=plan.api_key_id,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
            lease_ids=tuple(str(lease.reservation_id) for lease in plan.draw.leases) if plan.draw else (),
        ),
        price=plan.price,
    )


# --- models -------------------------------------------------------------------------------


def models_available(*, authorization: str) -> list[str]:
    """The models the key may call: priced, and in its allowed list when it has one."""
    key = api_key_from_authorization(authorization)
    models = sorted(ModelPrice.objects.filter(kind=ModelPrice.Kind.CHAT).values_list("model", flat=True))
    if key.allowed_models:
        models = [m for m in models if m in key.allowed_models]
    return models
