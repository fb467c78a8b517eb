"""Tenant-scoped reads for the REST API: an API key acts for its whole tenant."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from .errors import NotFound
from .models import Conversation, Message


def conversation_list(*, tenant_id: int, end_user_id: Any = None, external_id: str | None = None) -> QuerySet[Conversation]:
    """The tenant's conversations; of one end user when its id or external id is given."""
    queryset = Conversation.objects.for_tenant(tenant_id).select_related("assistant", "end_user")
    if end_user_id is not None:
        queryset = queryset.filter(end_user_id=end_user_id)
    return queryset if external_id is None else queryset.filter(end_user__external_id=external_id)


def message_list(*, conversation: Conversation) -> QuerySet[Message]:
    return Message.objects.for_tenant(conversation.tenant_id).filter(conversation=conversation)


def message_get(*, conversation: Conversation, message_id: Any) -> Message:
    try:
        return message_list(conversation=conversation).get(id=message_id)
    except (Message.DoesNotExist, ValidationError, ValueError):
        raise NotFound("message") from None
