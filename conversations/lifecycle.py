"""Conversation writes outside a turn: creating one for an end user (REST), deleting one."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from tenants.models import Tenant
from tenants.services import EndUserToken, end_user_get_or_create, end_user_token_issue

from .errors import GenerationBusy
from .gatekeepers import access_assistant, access_tenant_conversation, end_user_admit
from .models import Conversation
from .services import generation_claimed

# REST callers that name no end user talk as this one: usage, limits and history still hang
# off a real EndUser row, shared by the tenant's server-side integrations.
DEFAULT_END_USER = "api"


def conversation_create(
    *, tenant: Tenant, assistant_slug: str | None, end_user_external_id: str | None, title: str = ""
) -> Conversation:
    """Raises NotFound for an unknown assistant slug, EndUserBlocked for a blocked end user."""
    assistant = access_assistant(tenant_id=tenant.pk, slug=assistant_slug)
    end_user = end_user_get_or_create(tenant_id=tenant.pk, external_id=end_user_external_id or DEFAULT_END_USER)
    end_user_admit(end_user)
    conversation = Conversation.objects.create(tenant=tenant, assistant=assistant, end_user=end_user, title=title)
    # The caller gets the related rows back without another query.
    conversation.assistant, conversation.end_user = assistant, end_user
    return conversation


def end_user_token_mint(*, tenant_id: int, external_id: str, ttl_seconds: int) -> EndUserToken:
    """A socket token for the end user (created on first use). Raises EndUserBlocked."""
    end_user = end_user_admit(end_user_get_or_create(tenant_id=tenant_id, external_id=external_id))
    return end_user_token_issue(end_user=end_user, ttl_seconds=ttl_seconds)


def conversation_rename(*, conversation: Conversation, title: str) -> None:
    """A new title; the conversation keeps its place in the list (updated_at is its last turn)."""
    Conversation.objects.filter(pk=conversation.pk, tenant_id=conversation.tenant_id).update(title=title)


def conversation_delete(*, tenant_id: int, conversation_id: object) -> None:
    """Delete a conversation and its messages (the usage ledger keeps its rows). Refused while
    a reply is being generated: the generation would write into a deleted conversation."""
    with transaction.atomic():
        found = access_tenant_conversation(tenant_id=tenant_id, conversation_id=conversation_id)
        conversation = Conversation.objects.select_for_update().get(pk=found.pk)
        if generation_claimed(conversation, timezone.now()):
            raise GenerationBusy()
        conversation.delete()
