"""The gatekeepers: the one way each surface fetches a conversation or an assistant for a
caller. A foreign, missing or malformed id raises exactly what a missing one raises, and a
blocked end user is refused on every surface."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError

from tenants.callers import Caller
from tenants.models import EndUser

from .errors import EndUserBlocked, NotFound
from .models import Assistant, Conversation
from .selectors import conversation_list


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


def access_tenant_conversation(*, tenant_id: int, conversation_id: Any) -> Conversation:
    """The tenant's conversation with this id, whoever its end user. A foreign, missing or
    malformed id raises the same NotFound."""
    try:
        return conversation_list(tenant_id=tenant_id).get(id=conversation_id)
    except (Conversation.DoesNotExist, ValidationError, ValueError):
        raise NotFound("conversation") from None
