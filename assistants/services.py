"""Assistant writes from the REST API: one default per tenant, no deleting one still in use, each write audited."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import ProtectedError

from conversations.models import Assistant
from tenants.audit import audit_record


class AssistantInUse(Exception):
    """Conversations still use the assistant (their foreign key protects it)."""


class SlugTaken(Exception):
    """The tenant already has an assistant with this slug."""


def assistant_save(*, tenant_id: int, assistant: Assistant | None, fields: dict[str, Any], actor_label: str) -> Assistant:
    """Create (`assistant` None) or change an assistant. Raises SlugTaken."""
    action = "assistant.create" if assistant is None else "assistant.change"
    assistant = assistant or Assistant(tenant_id=tenant_id)
    changed = sorted(name for name, value in fields.items() if action.endswith("create") or getattr(assistant, name) != value)
    for name, value in fields.items():
        setattr(assistant, name, value)
    try:
        with transaction.atomic():
            if fields.get("is_default"):  # one default per tenant: the new one takes it over
                Assistant.objects.for_tenant(tenant_id).filter(is_default=True).exclude(pk=assistant.pk).update(
                    is_default=False)
            assistant.save()  # a full save: the tenant's configuration version moves (tenants.freshness)
            audit_record(tenant_id=tenant_id, action=action, actor_label=actor_label, obj=assistant, changes=changed)
    except IntegrityError:
        raise SlugTaken(f"an assistant with the slug {assistant.slug!r} already exists") from None
    return assistant


def assistant_delete(*, assistant: Assistant, actor_label: str) -> None:
    """Raises AssistantInUse while any conversation uses it: history keeps its assistant."""
    try:
        with transaction.atomic():
            audit_record(tenant_id=assistant.tenant_id, action="assistant.delete", actor_label=actor_label,
                         obj=assistant)
            assistant.delete()
    except ProtectedError:
        raise AssistantInUse(f"the assistant {assistant.slug!r} has conversations; it cannot be deleted") from None
