"""The audit trail: one service writes it, every surface that changes tenant state calls it."""

from __future__ import annotations

import json
from typing import Any

from django.db import models

from .models import AuditEntry


def audit_record(
    *,
    tenant_id: int | None,
    action: str,
    actor: Any = None,
    actor_label: str = "",
    obj: models.Model | None = None,
    changes: Any = None,
) -> AuditEntry:
    user = actor if getattr(actor, "is_authenticated", False) else None
    return AuditEntry.objects.create(
        tenant_id=tenant_id,
        actor=user,
        actor_label=actor_label or (user.get_username() if user else ""),
        action=action,
        object_type=obj._meta.label if obj is not None else "",
        object_id=str(obj.pk) if obj is not None and obj.pk is not None else "",
        object_repr=str(obj)[:200] if obj is not None else "",
        changes=_changes(changes),
    )


def _changes(changes: Any) -> Any:
    """Django's admin change message is JSON naming the changed fields (no values): keep it as
    data. Anything else is kept as given."""
    if isinstance(changes, str):
        try:
            return json.loads(changes) if changes else []
        except ValueError:
            return [changes]
    return changes if changes is not None else []
