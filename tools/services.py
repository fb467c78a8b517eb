"""Writes for webhook tools: create, change, rotate the signing secret — always validated."""

from __future__ import annotations

from typing import Any

from tenants.models import Tenant

from .models import WebhookTool, empty_parameters, webhook_secret_new

_CHANGEABLE = frozenset({"name", "description", "parameters", "url", "timeout_seconds", "is_active"})


def webhook_tool_create(
    *,
    tenant: Tenant,
    name: str,
    url: str,
    description: str = "",
    parameters: dict[str, Any] | None = None,
    secret: str = "",
    timeout_seconds: int = 10,
    is_active: bool = True,
) -> WebhookTool:
    """A new webhook tool; a blank secret is generated. Raises ValidationError (per field) for
    a bad name, schema, URL or timeout, or a name the tenant already uses."""
    tool = WebhookTool(
        tenant=tenant,
        name=name,
        description=description,
        parameters=empty_parameters() if parameters is None else parameters,
        url=url,
        secret=secret or webhook_secret_new(),
        timeout_seconds=timeout_seconds,
        is_active=is_active,
    )
    tool.full_clean()
    tool.save()
    return tool


def webhook_tool_update(*, tool: WebhookTool, **changes: Any) -> WebhookTool:
    """Change some of name, description, parameters, url, timeout_seconds, is_active.
    Raises ValidationError like `webhook_tool_create`; the secret changes only by rotation."""
    unknown = set(changes) - _CHANGEABLE
    if unknown:
        raise TypeError(f"cannot change {', '.join(sorted(unknown))} of a webhook tool")
    for name, value in changes.items():
        setattr(tool, name, value)
    tool.full_clean()
    tool.save(update_fields=[*changes, "updated_at"])
    return tool


def webhook_secret_rotate(*, tool: WebhookTool) -> str:
    """A new signing secret, returned once for the tenant to install; calls sign with it at once."""
    tool.secret = webhook_secret_new()
    tool.save(update_fields=["secret", "updated_at"])
    return tool.secret
