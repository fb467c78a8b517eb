"""Assistant writes from the REST API: one default per tenant, no deleting one still in use, each write audited."""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import ProtectedError

from tenants.audit import audit_record

from .errors import InvalidInput
from .models import Assistant


class AssistantInUse(Exception):
    """Conversations still use the assistant (their foreign key protects it)."""


def _default_clear(tenant_id: int, *, keep: int | None = None) -> None:
    # One default per tenant (a partial unique constraint): the new default takes it over.
    Assistant.objects.for_tenant(tenant_id).filter(is_default=True).exclude(pk=keep).update(is_default=False)


def assistant_create(*, tenant_id: int, fields: dict[str, Any], actor_label: str) -> Assistant:
    """Raises InvalidInput when the slug is taken."""
    try:
        with transaction.atomic():
            if fields.get("is_default"):
                _default_clear(tenant_id)
            assistant = Assistant.objects.create(tenant_id=tenant_id, **fields)
            audit_record(tenant_id=tenant_id, action="assistant.create", actor_label=actor_label, obj=assistant,
                         changes=sorted(fields))
    except IntegrityError:
        raise InvalidInput(f"an assistant with the slug {fields.get('slug')!r} already exists") from None
    return assistant


def assistant_update(*, assistant: Assistant, fields: dict[str, Any], actor_label: str) -> Assistant:
    """Raises InvalidInput when the new slug is taken."""
    changed = sorted(name for name, value in fields.items() if getattr(assistant, name) != value)
    for name, value in fields.items():
        setattr(assistant, name, value)
    try:
        with transaction.atomic():
            if fields.get("is_default"):
                _default_clear(assistant.tenant_id, keep=assistant.pk)
            assistant.save()  # a full save: the configuration version moves (tenants.freshness)
            audit_record(tenant_id=assistant.tenant_id, action="assistant.change", actor_label=actor_label,
                         obj=assistant, changes=changed)
    except IntegrityError:
        raise InvalidInput(f"an assistant with the slug {assistant.slug!r} already exists") from None
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
