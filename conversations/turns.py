"""Turn admission: the short transaction before a generation (the user's message committed,
the worst case held against the caps, the conversation's generation slot claimed)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.utils import timezone

from billing.caps import Subject
from billing.metering import Hold, call_hold
from billing.services import Price, price_for
from llm.gateway import ChatRequest, ProviderTarget
from llm.tokens import count_message
from moderation.rules import PolicySnapshot
from moderation.services import policy_for
from tenants import ratelimits
from tenants.models import ApiKey, EndUser, Tenant
from tenants.services import end_user_hash
from tools.registry import tool_definitions

from .context import Prompt, prompt_assemble
from .errors import GenerationBusy, InvalidInput
from .gatekeepers import Caller, access_assistant, access_conversation, end_user_admit
from .models import Assistant, Conversation, Message
from .providers import provider_target
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
        if generation_claimed(conversation, now):
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
            subject=Subject(caller.tenant_id, caller.end_user_id, caller.api_key_id), price=price,
            model=assistant.model, prompt_tokens=prompt.tokens, max_tokens=assistant.max_tokens,
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
        hold=hold,
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

