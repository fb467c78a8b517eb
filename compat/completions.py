"""The stateless OpenAI-compatible call: who may use which model, what goes upstream, what is billed.

Nothing of the conversation is stored: the caller's messages are the prompt, and the only
write is the UsageRecord of the call. Everything before the upstream call is
`completion_admit`, on the event loop: the caller's configuration from the process cache
(`conversations.admission`), the rate limits and the configuration versions in one Redis round trip, and — when
a cap applies — the hold (billing.metering: a draw on this process's leases, or the one
database hop before the first token). Everything after the call is `completion_settle`, on a
database thread, after the stream: `call_book`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from billing.caps import Subject
from billing.metering import CallFacts, Hold, call_book, call_hold_async, call_release_async, holds_close_tenant
from billing.models import ModelPrice, UsageRecord
from billing.services import Price, prices_visible
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
from conversations.errors import ModerationBlocked
from conversations.lifecycle import DEFAULT_END_USER
from llm import relay
from llm.gateway import ProviderTarget, Usage
from llm.tokens import PROMPT_FIELDS, UncountableContent, count_request_prompt
from moderation.gate import OutputGate
from moderation.rules import PolicySnapshot
from moderation.services import ModerationContext, moderate
from observability.context import context_bind
from responsecache.requests import request_cache_key
from routing.aliases import AliasConfig, alias_names, aliases_load, cached_aliases
from routing.selection import Grading, Routed
from tenants import ratelimits
from tenants.authentication import api_key_from_authorization, api_key_touch_by_id, bearer_token
from tenants.freshness import versions_parse, versions_read, versions_stored_keys
from tenants.services import InvalidApiKey, api_key_prefix, end_user_hash

from .aliased import alias_route
from .db import database_away, database_ping
from .requests import InvalidRequest, output_bound, upstream_body, user_text

__all__ = ["EndUserBlocked", "ModelNotAvailable"]  # raised from here; defined with the admission cache
# --- before the call ----------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionPlan:
    hold: Hold  # the call's id, caller, model, price, prompt count and what it holds on the caps
    target: ProviderTarget
    upstream_body: bytes
    stream: bool
    forward_usage: bool  # the caller asked for stream_options.include_usage
    limits: tuple[ratelimits.LimitState, ...] = ()  # after this call was counted: for headers
    moderation: PolicySnapshot | None = None  # the tenant's content policy, for the answer
    routed: Routed | None = None  # the request named one of the tenant's aliases
    alias: str = ""
    # The response cache (compat/cached.py): the request's key when the key opted in and the
    # request is eligible; `cache_opted` sends `X-Parley-Cache` either way.
    cache_key: str | None = None
    cache_opted: bool = False
    cache_question: str = ""

    @property
    def call_id(self) -> str:
        return self.hold.call_id

    @property
    def tenant_id(self) -> int:
        return self.hold.subject.tenant_id

    @property
    def api_key_id(self) -> int:
        assert self.hold.subject.api_key_id is not None
        return self.hold.subject.api_key_id

    @property
    def end_user_id(self) -> uuid.UUID:
        assert self.hold.subject.end_user_id is not None
        return self.hold.subject.end_user_id

    @property
    def model(self) -> str:
        return self.hold.model

    @property
    def price(self) -> Price:
        return self.hold.price

    @property
    def prompt_tokens(self) -> int:
        """Our count of the prompt: what is billed when the provider sends no usage."""
        return self.hold.prompt_tokens

    @property
    def output_checked(self) -> bool:
        return self.moderation is not None and self.moderation.check_output

    @property
    def sentence_checked(self) -> bool:
        """A stream's answer is checked sentence by sentence, each held back until it passes."""
        return self.output_checked and bool(self.moderation and self.moderation.stream_check_sentences)


Hop = Callable[..., Awaitable[Any]]  # runs a synchronous database function off the event loop

# Prompts longer than this are counted on a thread: tiktoken holds the loop otherwise.
COUNT_ON_LOOP_CHARS = 16_000


async def completion_admit(
    *, authorization: str, request: dict[str, Any], hop: Hop, cache_asked: bool = False
) -> CompletionPlan:
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
    context_bind(tenant_id=access.tenant_id)
    price, alias = await _admit_model(access, end_user=end_user, price=price, model=model, hop=hop)
    prompt_tokens = await _prompt_tokens(request, model)
    _, default_max_tokens = access.defaults()

    # One Redis round trip: every rate limit, and the versions the cached configuration needs.
    tokens = prompt_tokens + output_bound(request, default_max_tokens=default_max_tokens)
    checks = ratelimits.checks_for(access.caller(end_user.id), access.limits, tokens=tokens)
    acquired = await ratelimits.rate_limits_acquire_async(checks, also_read=versions_stored_keys(access.tenant_id))
    # Embedded mode reads nothing from Redis: its versions are in this process's memory.
    versions = versions_parse(acquired.read) if acquired.read else versions_read(access.tenant_id)
    if versions != access.versions:  # changed since cached: judge the call again on fresh rows
        holds_close_tenant(access.tenant_id, hop=hop)
        loaded = await hop(access_load, prefix=prefix, token=token, external_id=external_id, model=model)
        access, end_user = loaded.access, loaded.end_user
        price, alias = await _admit_model(access, end_user=end_user, price=loaded.price, model=model, hop=hop)
    target, default_max_tokens = access.defaults()

    call_id = f"cmpl-{uuid.uuid4()}"
    subject = access.caller(end_user.id)
    caps = access.tenant.caps_for(subject)
    await _input_check(access.moderation, request["messages"], target=target, subject=subject)
    routed = None
    cache_key = request_cache_key(request, asked=cache_asked) if access.response_cache else None
    if alias is not None:  # the alias's routes choose the model that answers
        routed = await alias_route(
            access, alias, request=request, prompt_tokens=prompt_tokens, hop=hop,
            max_tokens=output_bound(request, default_max_tokens=default_max_tokens),
            grading=Grading(target=target, subject=subject, caps=caps), cache_key=cache_key,
        )
        price, model = routed.price, routed.model
    if database_away():  # the last query failed: ask PostgreSQL before the provider is paid (a 503 if away)
        await hop(database_ping)
    # A hold carries this process's id: should it die, the process sweep settles the hold.
    process_id = await v1_liveness.process_id(hop) if caps else None
    hold = await call_hold_async(
        subject=subject, caps=caps, price=price, model=model, prompt_tokens=prompt_tokens,
        max_tokens=output_bound(request, default_max_tokens=default_max_tokens), call_id=call_id, hop=hop,
        process_id=process_id,
    )
    try:
        stream = bool(request.get("stream"))
        return CompletionPlan(
            hold=hold,
            target=target,
            upstream_body=upstream_body(
                {**request, "model": model},
                user_hash=end_user_hash(tenant_id=access.tenant_id, end_user_id=end_user.id),
                default_max_tokens=default_max_tokens,
            ),
            stream=stream,
            forward_usage=stream and bool((request.get("stream_options") or {}).get("include_usage")),
            limits=acquired.states,
            moderation=access.moderation,
            routed=routed,
            alias=request["model"] if routed else "",
            cache_key=cache_key,
            cache_opted=access.response_cache,
            cache_question=user_text(request["messages"])[:4000] if access.response_cache else "",
        )
    except BaseException:
        await asyncio.shield(call_release_async(hold, hop=hop))
        raise


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


async def _admit_model(
    access: KeyConfig, *, end_user: EndUserAccess, price: Price | None, model: str, hop: Hop
) -> tuple[Price | None, AliasConfig | None]:
    """The model's price, or — for a name with no price — the tenant's alias of that name
    (its routes choose the model later). Raises ModelNotAvailable, EndUserBlocked."""
    if price is None:
        version = access.versions[0]
        aliases = cached_aliases(access.tenant_id, version)
        if aliases is None:
            aliases = await hop(aliases_load, tenant_id=access.tenant_id, version=version)
        if model in aliases:
            access.model_check(model)
            if end_user.is_blocked:
                raise EndUserBlocked()
            return None, aliases[model]
    return _admissible(access, end_user=end_user, price=price, model=model), None


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
    *, plan: CompletionPlan, usage: Usage | None, content: str, outcome: str, latency_ms: int, ttft_ms: int | None,
    error: BaseException | None = None,
) -> UsageRecord:
    """Book the call (billing.metering: its one UsageRecord, from the provider's usage or our
    count of what was relayed; $0 when the provider refused it) and note the key's use.
    Idempotent on the plan's call id; a call whose process was taken for dead books nothing
    the sweep booked."""
    record = call_book(
        hold=plan.hold, usage=usage, error=error, content=content,
        facts=CallFacts(
            kind=UsageRecord.Kind.COMPLETION, outcome=outcome, latency_ms=latency_ms, ttft_ms=ttft_ms,
            **(plan.routed.ledger(requested_model=plan.alias) if plan.routed else {}),
        ),
    )
    api_key_touch_by_id(plan.api_key_id)
    return record


# --- models -------------------------------------------------------------------------------


def models_available(*, authorization: str) -> list[str]:
    """The models the key may call: priced (globally or by its tenant), or the tenant's aliases,
    and in its allowed list when it has one."""
    key = api_key_from_authorization(authorization)
    models = sorted(prices_visible(tenant_id=key.tenant_id, kind=ModelPrice.Kind.CHAT))
    models += [name for name in alias_names(key.tenant_id) if name not in models]  # the tenant's /v1 aliases
    if key.allowed_models:
        models = [m for m in models if m in key.allowed_models]
    return models
