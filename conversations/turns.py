"""Turn admission: the short transaction before a generation (the user's message committed,
the worst case held against the caps, the conversation's generation slot claimed)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from django.db import transaction
from django.utils import timezone

from billing.metering import Hold, call_hold
from billing.services import Price
from llm.gateway import ChatRequest, ProviderTarget
from llm.tokens import count_message
from moderation.rules import PolicySnapshot
from responsecache.chat import CacheScope, Lookup, turn_cache_scope
from routing.rules import GradeNeeded, Grades
from routing.selection import Grading, Routed, TurnFacts, route_choose
from tenants import ratelimits
from tenants.callers import Caller
from tenants.freshness import versions_parse, versions_read, versions_stored_keys
from tenants.services import end_user_hash
from tools.registry import tool_definitions

from .admission import TurnConfig, price_get, turn_config
from .context import Prompt, prompt_assemble
from .errors import GenerationBusy, InvalidInput
from .gatekeepers import access_conversation
from .models import Assistant, Conversation, Message
from .services import (
    generation_claimed,
    group_name,
)
from .summaries import summary_needed

# --- before the stream --------------------------------------------------------------------


@dataclass(frozen=True)
class TurnPlan:
    caller: Caller
    conversation_id: uuid.UUID
    conversation_created: bool
    user_message_id: uuid.UUID
    client_msg_id: str | None
    assistant_message_id: uuid.UUID
    user_seq: int
    model: str
    price: Price
    prompt: Prompt
    request: ChatRequest
    target: ProviderTarget
    hold: Hold  # the first upstream call's
    summary_due: bool = False
    moderation: PolicySnapshot | None = None
    user_content: str = ""
    limit_states: tuple[ratelimits.LimitState, ...] = ()
    tool_names: tuple[str, ...] = ()
    max_tool_rounds: int = 0
    end_user_external_id: str = ""
    routed: Routed | None = None  # the assistant's routes chose `model`
    response_cache: CacheScope | None = None  # None: the turn is not cacheable
    cache_lookup: Lookup | None = None  # the cache already asked (before a classifier route), or None

    @property
    def group(self) -> str:
        return group_name(tenant_id=self.caller.tenant_id, conversation_id=self.conversation_id)

    @property
    def owner(self) -> CallOwner:
        return CallOwner(
            caller=self.caller, conversation_id=self.conversation_id, assistant_message_id=self.assistant_message_id,
            model=self.model, price=self.price, prompt_tokens=self.prompt.tokens, routed=self.routed,
        )


@dataclass(frozen=True)
class CallOwner:
    """Whose upstream calls a turn's ledger rows are: what billing needs of a turn, which the
    stale-generation sweep can rebuild without the turn's plan."""

    caller: Caller
    conversation_id: uuid.UUID
    assistant_message_id: uuid.UUID
    model: str
    price: Price
    prompt_tokens: int
    routed: Routed | None = None


@dataclass(frozen=True)
class Resume:
    """Where a turn that needs a grade resumes (`GradeNeeded.resume`): its admission and the
    limits it counted, and the response cache it would use, which is asked before the grading
    call: a turn the cache answers needs no model chosen."""

    admission: _Admission
    limit_states: tuple
    cache: CacheScope | None


@dataclass(frozen=True)
class _Admission:
    """What a turn is admitted on, read with no lock held: the rate limits count its prompt."""

    conversation: Conversation | None  # None: the turn starts a conversation
    config: TurnConfig  # the caller's configuration, assistant and price (cached)
    tools: list[dict[str, Any]]
    user_message: Message  # not stored yet
    prompt: Prompt  # the user's message included
    # A new conversation's id, chosen now: the calls made before it is stored (a classifier's
    # grading, the response cache's embedding) are booked to it.
    new_conversation_id: uuid.UUID = field(default_factory=uuid.uuid4)

    @property
    def assistant(self) -> Assistant:
        return self.config.assistant

    @property
    def conversation_id(self) -> uuid.UUID:
        return self.conversation.id if self.conversation is not None else self.new_conversation_id

    def prompt_current(self, conversation: Conversation) -> bool:
        """Whether the prompt read before the lock is still the conversation's (nothing was
        stored, summarised or released meanwhile: each of those moves one of these)."""
        read = self.conversation
        return read is None or (read.last_seq, read.summary_through_seq, read.updated_at) == (
            conversation.last_seq, conversation.summary_through_seq, conversation.updated_at
        )


def _turn_admission(
    *, caller: Caller, content: str, conversation_id, assistant_slug, now, reload: bool = False
) -> _Admission:
    """Everything a turn's admission needs, read outside any transaction: the conversation and
    its prompt from the database, the configuration from this process's cache (`admission`).
    Raises NotFound, EndUserBlocked, GenerationBusy, PriceMissing, InvalidInput."""
    conversation = None
    if conversation_id is not None:
        conversation = access_conversation(caller=caller, conversation_id=conversation_id)  # checks the end user
        if generation_claimed(conversation, now):
            raise GenerationBusy()
        config = turn_config(caller=caller, assistant_id=conversation.assistant_id, end_user_check=False, reload=reload)
    else:
        config = turn_config(caller=caller, assistant_slug=assistant_slug, reload=reload)
    assistant, price = config.assistant, config.price
    user_tokens = count_message({"role": "user", "content": content}, assistant.model)
    if user_tokens + assistant.max_tokens >= price.context_window:
        raise InvalidInput("the message does not fit the model's context window")
    user_message = Message(
        tenant_id=caller.tenant_id, role=Message.Role.USER, content=content, tokens=user_tokens,
    )
    tools = tool_definitions(tenant_id=caller.tenant_id, names=list(assistant.tools or []))
    prompt = prompt_assemble(
        conversation=conversation or Conversation(tenant_id=caller.tenant_id, assistant=assistant),
        assistant=assistant, context_window=price.context_window, tools=tools, newest=user_message,
    )
    return _Admission(conversation=conversation, config=config, tools=tools, user_message=user_message, prompt=prompt)


def _limits_acquire(*, caller: Caller, admission: _Admission, **read: Any) -> tuple[_Admission, tuple]:
    """Every rate limit (requests and the prompt's tokens) at once, all or nothing, and the
    tenant's configuration versions, in one Redis round trip. A turn whose configuration
    changed since it was cached is admitted again on fresh rows, and judged again on the
    limits those rows set (`_limits_rejudge`). Raises RateLimited, and what `_turn_admission`
    raises."""
    config = admission.config
    checks = ratelimits.checks_for(caller, config.limits, tokens=admission.prompt.tokens + config.assistant.max_tokens)
    acquired = ratelimits.rate_limits_acquire_reading(checks, also_read=versions_stored_keys(caller.tenant_id))
    # Embedded mode reads nothing from Redis: its versions are in this process's memory.
    versions = versions_parse(acquired.read) if acquired.read else versions_read(caller.tenant_id)
    if versions != config.tenant.versions:
        admission = _turn_admission(caller=caller, reload=True, **read)
        _limits_rejudge(caller=caller, admission=admission, counted=checks)
    return admission, acquired.states


def _limits_rejudge(*, caller: Caller, admission: _Admission, counted: list[ratelimits.Check]) -> None:
    """A limit the fresh configuration adds is counted now; one it changes is checked with
    nothing more counted (this turn is in its window already). Raises RateLimited."""
    tokens = admission.prompt.tokens + admission.assistant.max_tokens
    names = {check.name for check in counted}
    changed = [
        check if check.name not in names else replace(check, cost=0)
        for check in ratelimits.checks_for(caller, admission.config.limits, tokens=tokens)
        if check not in counted
    ]
    if changed:
        ratelimits.rate_limits_acquire(changed)


def _open_conversation(*, caller: Caller, admission: _Admission, content: str) -> tuple[Conversation, bool]:
    if admission.conversation is not None:
        return access_conversation(caller=caller, conversation_id=admission.conversation.id, lock=True), False
    conversation = Conversation.objects.create(
        id=admission.new_conversation_id,
        tenant_id=caller.tenant_id,
        assistant=admission.assistant,
        end_user_id=caller.end_user_id,
        title=" ".join(content.split())[:80],
    )
    return conversation, True


def turn_prepare(
    *,
    caller: Caller,
    content: str,
    conversation_id: uuid.UUID | None,
    assistant_slug: str | None,
    client_msg_id: str | None,
    control_channel: str,
    grades: Grades | None = None,
    resume: Resume | None = None,
    cached: Lookup | None = None,
) -> TurnPlan:
    """Admit the turn, then in one short transaction: commit the user's message, reserve the
    prompt's worst-case cost against every cap, claim the conversation's generation slot. A
    refusal rolls all of it back. Raises NotFound, EndUserBlocked, InvalidInput, GenerationBusy,
    PriceMissing, RateLimited, CapExceeded.

    Admission reads the conversation and assembles the prompt with no lock held, the caller's
    configuration coming from the process cache (`admission`), then counts every rate limit
    (requests and the prompt's tokens) at once, all or nothing, reading the configuration
    versions in the same Redis round trip (`_limits_acquire`: the script and pipeline `/v1`
    runs): no Redis trip happens while the conversation's row is locked, and a turn one
    limit refuses counts against none. The assistant's routes then choose the model; a
    classifier route raises GradeNeeded: call again with its grade and `resume`, or with
    `cached`, the response cache's lookup: a hit skips the routes (the stored answer is
    served whichever model wrote it), and the generation uses the lookup as it is."""
    now = timezone.now()
    assistant_message_id = uuid.uuid4()
    read = {"content": content, "conversation_id": conversation_id, "assistant_slug": assistant_slug, "now": now}
    admission, limit_states = (resume.admission, resume.limit_states) if resume else _limits_acquire(
        caller=caller, admission=_turn_admission(caller=caller, **read), **read
    )
    try:
        routed = _turn_route(caller=caller, admission=admission, content=content, grades=grades,
                             routes=cached is None or cached.hit is None)
    except GradeNeeded as needed:
        first_turn = admission.conversation is None or admission.conversation.last_seq == 0
        cache = turn_cache_scope(assistant=admission.assistant, first_turn=first_turn, tools=admission.tools)
        needed.resume = Resume(admission, limit_states, cache=cache)
        raise
    assistant, price = admission.assistant, routed.price
    with transaction.atomic():
        conversation, created = _open_conversation(caller=caller, admission=admission, content=content)
        if generation_claimed(conversation, now):
            raise GenerationBusy()
        user_message = admission.user_message
        user_message.conversation = conversation
        user_message.seq = conversation.last_seq + 1
        user_message.client_msg_id = client_msg_id or ""
        user_message.save(force_insert=True)
        prompt = admission.prompt
        if not admission.prompt_current(conversation):
            prompt = prompt_assemble(
                conversation=conversation, assistant=assistant, context_window=price.context_window,
                tools=admission.tools,
            )
        hold = call_hold(
            subject=caller, caps=admission.config.caps, price=price,
            model=routed.model, prompt_tokens=prompt.tokens, max_tokens=assistant.max_tokens,
            call_id=upstream_call_id(assistant_message_id, 0),
        )
        Conversation.objects.filter(pk=conversation.pk).update(
            last_seq=user_message.seq,
            generation_id=assistant_message_id,
            generation_channel=control_channel,
            generation_started_at=now,
            generation_beat_at=now,
            updated_at=now,
        )
    tools = admission.tools
    request = ChatRequest(
        model=routed.model,
        messages=prompt.messages,
        max_tokens=assistant.max_tokens,
        temperature=assistant.temperature,
        user=end_user_hash(tenant_id=caller.tenant_id, end_user_id=caller.end_user_id),
        tools=tools or None,
        tool_choice=api_tool_choice(assistant.tool_choice) if tools else None,
        parallel_tool_calls=assistant.parallel_tool_calls if tools else None,
    )
    return TurnPlan(
        caller=caller,
        conversation_id=conversation.id,
        conversation_created=created,
        user_message_id=user_message.id,
        client_msg_id=client_msg_id,
        assistant_message_id=assistant_message_id,
        user_seq=user_message.seq,
        model=routed.model,
        price=price,
        prompt=prompt,
        request=request,
        target=admission.config.target,
        hold=hold,
        summary_due=summary_needed(
            assistant=assistant, history_tokens=prompt.history_tokens, truncated=prompt.truncated,
            turns=(user_message.seq + 1) // 2, price=admission.config.price,
        ),
        moderation=admission.config.tenant.moderation,
        user_content=content,
        limit_states=limit_states,
        tool_names=tuple(assistant.tools or ()) if tools else (),
        max_tool_rounds=assistant.max_tool_rounds,
        end_user_external_id=conversation.end_user.external_id if tools else "",
        routed=routed,
        response_cache=turn_cache_scope(assistant=assistant, first_turn=user_message.seq == 1, tools=tools),
        cache_lookup=cached,
    )


def _turn_route(
    *, caller: Caller, admission: _Admission, content: str, grades: Grades | None, routes: bool = True
) -> Routed:
    config, conversation = admission.config, admission.conversation
    return route_choose(
        routes=config.assistant.routes if routes else None, default_model=config.assistant.model, default_price=config.price,
        turn=TurnFacts(
            question=content, input_tokens=admission.prompt.tokens, tools_needed=bool(admission.tools),
            max_tokens=config.assistant.max_tokens, depth=lambda: _depth(conversation),
        ),
        price_of=lambda model: price_get(config.tenant, model), grades=grades,
        grading=Grading(target=config.target, subject=caller, caps=config.caps, conversation_id=admission.conversation_id),
    )


def _depth(conversation: Conversation | None) -> int:
    """User messages in the conversation, this turn's included (only when a route asks)."""
    if conversation is None:
        return 1
    return Message.objects.filter(conversation_id=conversation.id, role=Message.Role.USER).count() + 1


def upstream_call_id(assistant_message_id: uuid.UUID, round_number: int) -> str:
    """The ledger key of one upstream call of a turn: retried writes never double-bill."""
    return f"msg-{assistant_message_id}" + (f"-r{round_number}" if round_number else "")


def api_tool_choice(choice: str) -> Any:
    if choice in ("auto", "required", "none"):
        return choice
    return {"type": "function", "function": {"name": choice}}


