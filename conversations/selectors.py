"""Tenant-scoped reads for the REST API: an API key acts for its whole tenant."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from .errors import NotFound
from .models import Conversation, Message


def conversation_list(*, tenant_id: int) -> QuerySet[Conversation]:
    return Conversation.objects.for_tenant(tenant_id).select_related("assistant", "end_user")


def message_list(*, conversation: Conversation) -> QuerySet[Message]:
    return Message.objects.for_tenant(conversation.tenant_id).filter(conversation=conversation)


def message_get(*, conversation: Conversation, message_id: Any) -> Message:
    try:
        return message_list(conversation=conversation).get(id=message_id)
    except (Message.DoesNotExist, ValidationError, ValueError):
        raise NotFound("message") from None
