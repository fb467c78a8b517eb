"""Chat services: gatekeepers, and the short transactions before and after a generation.

Everything here is synchronous ORM code; the async engine reaches it through one
`database_sync_to_async` hop before the stream and one after.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from billing import ratelimits
from billing.caps import Subject, cap_reserve, cap_settle
from billing.models import Reservation, UsageRecord
from billing.services import Price, UsageInput, price_for, usage_record
from llm.gateway import ChatRequest, ProviderTarget
from llm.tokens import count_message, count_text
from moderation.rules import PolicySnapshot
from moderation.services import policy_for
from tenants.models import ApiKey, EndUser, Tenant
from tenants.services import end_user_hash
from tools.registry import tool_definitions

from .context import Prompt, prompt_assemble
from .errors import EndUserBlocked, GenerationBusy, InvalidInput, NotFound
from .models import Assistant, Conversation, Message
from .providers import provider_target
from .summaries import summary_needed


@dataclass(frozen=True)
class Caller:
    """Who is talking: always a tenant and one of its end users; an API key when REST."""

    tenant_id: int
    end_user_id: uuid.UUID
    api_key_id: int | None = None


def group_name(*, tenant_id: int, conversation_id: uuid.UUID | str) -> str:
    return f"t{tenant_id}.c{conversation_id}"


# --- gatekeepers --------------------------------------------------------------------------


def end_user_admit(end_user: EndUser) -> EndUser:
    """The one rule every surface applies: a blocked end user is refused. Raises EndUserBlocked."""
    if end_user.is_blocked:
        raise EndUserBlocked()
    return end_user


def access_conversation(*, caller: Caller, conversation_id: Any, lock: bool = False) -> Conversation:
    """Raises NotFound, or EndUserBlocked once the caller's end user is blocked (a socket
    opened before the block learns it here, on its next turn, join or cancel)."""
    queryset = Conversation.objects.for_tenant(caller.tenant_id).filter(end_user_id=caller.end_user_id)
    if lock:
        queryset = queryset.select_for_update(of=("self",))
    try:
        conversation = queryset.select_related("assistant", "end_user").get(id=conversation_id)
    except (Conversation.DoesNotExist, ValidationError, ValueError):
        raise NotFound("conversation") from None
    end_user_admit(conversation.end_user)
    return conversation


def access_assistant(*, tenant_id: int, slug: str | None) -> Assistant:
    queryset = Assistant.objects.for_tenant(tenant_id)
    try:
        if slug is None:
            return queryset.get(is_default=True)
        return queryset.get(slug=slug)
    except Assistant.DoesNotExist:
        raise NotFound("assistant") from None


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
    reservation: Reservation
    summary_due: bool = False
    moderation: PolicySnapshot | None = None
    user_content: str = ""
    limit_states: tuple[ratelimits.LimitState, ...] = ()
    tool_names: tuple[str, ...] = ()
    max_tool_rounds: int = 0
    end_user_external_id: str = ""

    @property
    def group(self) -> str:
        return group_name(tenant_id=self.caller.tenant_id, conversation_id=self.conversation_id)

    @property
    def owner(self) -> CallOwner:
        return CallOwner(
            caller=self.caller, conversation_id=self.conversation_id, assistant_message_id=self.assistant_message_id,
            model=self.model, price=self.price, prompt_tokens=self.prompt.tokens,
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


def generation_stale_before(now) -> Any:
    return now - timedelta(seconds=settings.GENERATION_STALE_SECONDS)


def stale_claim(now) -> Q:
    """A claim whose heartbeat stopped; claims from before heartbeats go by their start."""
    cutoff = generation_stale_before(now)
    return Q(generation_beat_at__lt=cutoff) | Q(generation_beat_at__isnull=True, generation_started_at__lt=cutoff)


def _is_generating(conversation: Conversation, now) -> bool:
    """A claim whose heartbeat is older than GENERATION_STALE_SECONDS belongs to a process
    that died (the sweep in recovery.py stores its answer)."""
    if conversation.generation_id is None:
        return False
    beat = conversation.generation_beat_at or conversation.generation_started_at
    return beat is not None and beat >= generation_stale_before(now)


@dataclass(frozen=True)
class _Admission:
    """What a turn is admitted on, read with no lock held: the rate limits count its prompt."""

    conversation: Conversation | None  # None: the turn starts a conversation
    assistant: Assistant
    price: Price
    target: ProviderTarget
    tools: list[dict[str, Any]]
    user_message: Message  # not stored yet
    prompt: Prompt  # the user's message included

    def prompt_current(self, conversation: Conversation) -> bool:
        """Whether the prompt read before the lock is still the conversation's (nothing was
        stored, summarised or released meanwhile: each of those moves one of these)."""
        read = self.conversation
        return read is None or (read.last_seq, read.summary_through_seq, read.updated_at) == (
            conversation.last_seq, conversation.summary_through_seq, conversation.updated_at
        )


def _turn_admission(*, caller: Caller, content: str, conversation_id, assistant_slug, now) -> _Admission:
    """Everything a turn's admission needs, read outside any transaction. Raises NotFound,
    GenerationBusy, PriceMissing, InvalidInput."""
    conversation = None
    if conversation_id is not None:
        conversation = access_conversation(caller=caller, conversation_id=conversation_id)
        if _is_generating(conversation, now):
            raise GenerationBusy()
        assistant = conversation.assistant
    else:
        end_user_admit(EndUser.objects.only("is_blocked").get(pk=caller.end_user_id, tenant_id=caller.tenant_id))
        assistant = access_assistant(tenant_id=caller.tenant_id, slug=assistant_slug)
    price = price_for(assistant.model)
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
    return _Admission(
        conversation=conversation, assistant=assistant, price=price, target=provider_target(assistant),
        tools=tools, user_message=user_message, prompt=prompt,
    )


def _open_conversation(*, caller: Caller, admission: _Admission, content: str) -> tuple[Conversation, bool]:
    if admission.conversation is not None:
        return access_conversation(caller=caller, conversation_id=admission.conversation.id, lock=True), False
    conversation = Conversation.objects.create(
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
) -> TurnPlan:
    """Admit the turn, then in one short transaction: commit the user's message, reserve the
    prompt's worst-case cost against every cap, claim the conversation's generation slot. A
    refusal rolls all of it back. Raises NotFound, InvalidInput, GenerationBusy, PriceMissing,
    RateLimited, CapExceeded.

    Admission reads the conversation and assembles the prompt with no lock held, then counts
    every rate limit (requests and the prompt's tokens) at once, all or nothing, in one Redis
    round trip (`ratelimits.rate_limit_hit`: the script `/v1` runs): no Redis trip
    happens while the conversation's row is locked, and a turn one limit refuses counts
    against none."""
    now = timezone.now()
    assistant_message_id = uuid.uuid4()
    admission = _turn_admission(
        caller=caller, content=content, conversation_id=conversation_id, assistant_slug=assistant_slug, now=now
    )
    assistant, price = admission.assistant, admission.price
    limit_states = ratelimits.rate_limit_hit(
        caller=rate_limits_for(caller), tokens=admission.prompt.tokens + assistant.max_tokens
    )
    with transaction.atomic():
        conversation, created = _open_conversation(caller=caller, admission=admission, content=content)
        if _is_generating(conversation, now):
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
        reservation = cap_reserve(
            subject=Subject(caller.tenant_id, caller.end_user_id, caller.api_key_id),
            amount=worst_case_cost(price=price, prompt_tokens=prompt.tokens, max_tokens=assistant.max_tokens),
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
        model=assistant.model,
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
        model=assistant.model,
        price=price,
        prompt=prompt,
        request=request,
        target=admission.target,
        reservation=reservation,
        summary_due=summary_needed(
            assistant=assistant, history_tokens=prompt.history_tokens, truncated=prompt.truncated,
            turns=(user_message.seq + 1) // 2, price=price,
        ),
        moderation=policy_for(tenant_id=caller.tenant_id),
        user_content=content,
        limit_states=limit_states,
        tool_names=tuple(assistant.tools or ()) if tools else (),
        max_tool_rounds=assistant.max_tool_rounds,
        end_user_external_id=conversation.end_user.external_id if tools else "",
    )


def upstream_call_id(assistant_message_id: uuid.UUID, round_number: int) -> str:
    """The ledger key of one upstream call of a turn: retried writes never double-bill."""
    return f"msg-{assistant_message_id}" + (f"-r{round_number}" if round_number else "")


def api_tool_choice(choice: str) -> Any:
    if choice in ("auto", "required", "none"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def worst_case_cost(*, price: Price, prompt_tokens: int, max_tokens: int) -> Decimal:
    """Prompt at the full input price (no cache discount assumed) plus every allowed output
    token, with a margin for the provider counting the prompt a little differently."""
    margin = 1 + settings.RESERVATION_PROMPT_MARGIN
    return price.cost(prompt_tokens=int(prompt_tokens * margin) + 16, completion_tokens=max_tokens)


def rate_limits_for(caller: Caller) -> ratelimits.Caller:
    tenant = Tenant.objects.only("end_user_rpm", "tenant_rpm", "tenant_tpm").get(pk=caller.tenant_id)
    key_rpm = None
    if caller.api_key_id is not None:
        key_rpm = ApiKey.objects.filter(pk=caller.api_key_id).values_list("rpm", flat=True).first()
    return ratelimits.Caller(
        tenant_id=caller.tenant_id,
        end_user_rpm=tenant.end_user_rpm,
        tenant_rpm=tenant.tenant_rpm,
        tenant_tpm=tenant.tenant_tpm,
        end_user_id=caller.end_user_id,
        api_key_id=caller.api_key_id,
        api_key_rpm=key_rpm,
    )


# --- after the stream ---------------------------------------------------------------------


@dataclass(frozen=True)
class TurnOutcome:
    """What the last upstream call of a turn produced; token counts are None when the provider
    sent no usage. Turns with tool rounds pass the round's reservation and next free seq."""

    called_upstream: bool
    content: str
    status: str  # Message.Status
    finish_reason: str
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int
    latency_ms: int
    ttft_ms: int | None
    usage_outcome: str = UsageRecord.Outcome.OK
    round_number: int = 0
    reservation: Reservation | None = None
    seq: int | None = None
    prompt_estimate: int | None = None  # our count of this call's prompt, when usage is missing


@dataclass(frozen=True)
class TurnResult:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: Decimal


def _bill_call(
    *, plan: CallOwner, outcome: TurnOutcome, message_id: uuid.UUID, content: str, reservation: Reservation
) -> UsageRecord:
    """One UsageRecord for one upstream call, settled against its reservation."""
    estimated = outcome.prompt_tokens is None
    prompt_estimate = outcome.prompt_estimate if outcome.prompt_estimate is not None else plan.prompt_tokens
    record = usage_record(
        usage=UsageInput(
            call_id=upstream_call_id(plan.assistant_message_id, outcome.round_number),
            tenant_id=plan.caller.tenant_id,
            model=plan.model,
            prompt_tokens=prompt_estimate if outcome.prompt_tokens is None else outcome.prompt_tokens,
            completion_tokens=(
                count_text(content, plan.model) if outcome.completion_tokens is None else outcome.completion_tokens
            ),
            cached_tokens=outcome.cached_tokens,
            estimated=estimated,
            kind=UsageRecord.Kind.CHAT,
            outcome=outcome.usage_outcome,
            end_user_id=plan.caller.end_user_id,
            api_key_id=plan.caller.api_key_id,
            conversation_id=plan.conversation_id,
            message_id=message_id,
            latency_ms=outcome.latency_ms,
            ttft_ms=outcome.ttft_ms,
        ),
        price=plan.price,
    )
    cap_settle(reservation=reservation, actual=record.cost_usd)
    return record


def turn_finish(*, plan: TurnPlan, outcome: TurnOutcome) -> TurnResult:
    """Store the answer (complete or incomplete), bill the last call, release the conversation."""
    return answer_store(plan=plan.owner, outcome=replace(
        outcome,
        reservation=outcome.reservation or plan.reservation,
        seq=outcome.seq if outcome.seq is not None else plan.user_seq + 1,
    ))


def answer_store(*, plan: CallOwner, outcome: TurnOutcome) -> TurnResult:
    """The one way an answer is stored: by its generation, or by the sweep when that died.
    `outcome` carries the answer's seq and the last call's reservation."""
    reservation, seq = outcome.reservation, outcome.seq
    assert reservation is not None and seq is not None
    with transaction.atomic():
        Message.objects.create(
            id=plan.assistant_message_id,
            tenant_id=plan.caller.tenant_id,
            conversation_id=plan.conversation_id,
            seq=seq,
            role=Message.Role.ASSISTANT,
            content=outcome.content,
            tokens=count_message({"role": "assistant", "content": outcome.content}, plan.model),
            model=plan.model,
            status=outcome.status,
            finish_reason=outcome.finish_reason,
        )
        if not outcome.called_upstream:
            cap_settle(reservation=reservation, actual=Decimal(0))
            generation_release(conversation_id=plan.conversation_id, generation_id=plan.assistant_message_id, last_seq=seq)
            return TurnResult(prompt_tokens=0, completion_tokens=0, cached_tokens=0, cost_usd=Decimal(0))
        record = _bill_call(
            plan=plan, outcome=outcome, message_id=plan.assistant_message_id, content=outcome.content,
            reservation=reservation,
        )
        generation_release(conversation_id=plan.conversation_id, generation_id=plan.assistant_message_id, last_seq=seq)
    return TurnResult(
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        cached_tokens=record.cached_tokens,
        cost_usd=record.cost_usd,
    )


@dataclass(frozen=True)
class ToolRoundRecord:
    """One finished tool round: the model's calls and what each returned."""

    outcome: TurnOutcome  # the upstream call that asked for the tools
    tool_calls: list[dict[str, Any]]  # OpenAI wire shape: {"id", "type", "function": {"name", "arguments"}}
    results: list[tuple[str, str]]  # (call_id, content) per call, in order


@dataclass(frozen=True)
class ToolRoundStored:
    messages: list[dict[str, Any]]  # what to append to the next request
    next_seq: int
    cost_usd: Decimal
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


def tool_round_commit(*, plan: TurnPlan, record: ToolRoundRecord) -> ToolRoundStored:
    """Store the assistant's tool calls and their results in order, and bill the call."""
    outcome = record.outcome
    seq = outcome.seq if outcome.seq is not None else plan.user_seq + 1
    call_message = {"role": "assistant", "content": outcome.content or None, "tool_calls": record.tool_calls}
    result_messages = [{"role": "tool", "tool_call_id": call_id, "content": content} for call_id, content in record.results]
    with transaction.atomic():
        call_message_id = uuid.uuid4()
        rows = [
            Message(
                id=call_message_id, tenant_id=plan.caller.tenant_id, conversation_id=plan.conversation_id, seq=seq,
                role=Message.Role.ASSISTANT, content=outcome.content, tool_calls=record.tool_calls,
                tokens=count_message(call_message, plan.model), model=plan.model, status=Message.Status.COMPLETE,
                finish_reason=outcome.finish_reason,
            )
        ]
        for offset, message in enumerate(result_messages, start=1):
            rows.append(
                Message(
                    tenant_id=plan.caller.tenant_id, conversation_id=plan.conversation_id, seq=seq + offset,
                    role=Message.Role.TOOL, content=message["content"], tool_call_id=message["tool_call_id"],
                    tokens=count_message(message, plan.model), status=Message.Status.COMPLETE,
                )
            )
        Message.objects.bulk_create(rows)
        next_seq = seq + len(rows)
        Conversation.objects.filter(pk=plan.conversation_id).update(last_seq=next_seq - 1)
        usage = _bill_call(
            plan=plan.owner, outcome=outcome, message_id=call_message_id, content=outcome.content,
            reservation=outcome.reservation or plan.reservation,
        )
    return ToolRoundStored(
        messages=[call_message, *result_messages],
        next_seq=next_seq,
        cost_usd=usage.cost_usd,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
    )


def turn_input_blocked(*, plan: TurnPlan) -> None:
    """Input moderation blocked the turn before any model call: the user's message is kept,
    marked for review, and never sent upstream; nothing was spent."""
    with transaction.atomic():
        Message.objects.filter(pk=plan.user_message_id).update(status=Message.Status.BLOCKED)
        cap_settle(reservation=plan.reservation, actual=Decimal(0))
        generation_release(conversation_id=plan.conversation_id, generation_id=plan.assistant_message_id)


def round_reserve(*, plan: TurnPlan, round_number: int, prompt_tokens: int) -> Reservation:
    """Reserve the worst case of a turn's next upstream call. Raises CapExceeded."""
    with transaction.atomic():
        return cap_reserve(
            subject=Subject(plan.caller.tenant_id, plan.caller.end_user_id, plan.caller.api_key_id),
            amount=worst_case_cost(price=plan.price, prompt_tokens=prompt_tokens, max_tokens=plan.request.max_tokens),
            call_id=upstream_call_id(plan.assistant_message_id, round_number),
        )


def generation_release(*, conversation_id: uuid.UUID, generation_id: uuid.UUID, last_seq: int | None = None) -> None:
    # Conditional on our own claim: a stale claim taken over by another process stays theirs.
    fields: dict[str, Any] = {
        "generation_id": None, "generation_channel": "", "generation_started_at": None, "generation_beat_at": None,
        "updated_at": timezone.now(),
    }
    if last_seq is not None:
        fields["last_seq"] = last_seq
    Conversation.objects.filter(pk=conversation_id, generation_id=generation_id).update(**fields)


def generations_beat(*, generation_ids: list[uuid.UUID]) -> int:
    """Refresh the heartbeat of running generations (one UPDATE for all of a process's);
    how many claims are still theirs (a generation id is claimed by one conversation at most)."""
    return Conversation.objects.filter(generation_id__in=generation_ids).update(generation_beat_at=timezone.now())


def conversation_generation(*, caller: Caller, conversation_id: Any) -> tuple[Conversation, str | None]:
    """The conversation (through the gatekeeper) and the control channel of its running
    generation, if one is running and not stale."""
    conversation = access_conversation(caller=caller, conversation_id=conversation_id)
    return conversation, _control_channel(conversation)


def generation_running(*, plan: TurnPlan) -> bool:
    """Whether the turn's generation still holds its conversation's claim."""
    return Conversation.objects.filter(pk=plan.conversation_id, generation_id=plan.assistant_message_id).exists()


def stale_generations(*, conversation_id: uuid.UUID | None = None) -> list[tuple[int, uuid.UUID, uuid.UUID]]:
    """(tenant id, conversation id, generation id) of every claim whose heartbeat stopped."""
    queryset = Conversation.objects.filter(generation_id__isnull=False).filter(stale_claim(timezone.now()))
    if conversation_id is not None:
        queryset = queryset.filter(pk=conversation_id)
    return list(queryset.values_list("tenant_id", "id", "generation_id"))


def _control_channel(conversation: Conversation) -> str | None:
    if not _is_generating(conversation, timezone.now()) or not conversation.generation_channel:
        return None
    return conversation.generation_channel

