"""WebhookTool: a tenant's own tool, called over signed HTTPS."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Container
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from tenants.crypto import EncryptedTextField, mask
from tenants.models import TenantManager

from .validation import TOOL_NAME_RE, SchemaInvalid, schema_check

MAX_TIMEOUT_SECONDS = 30


def webhook_secret_new() -> str:
    return f"whsec_{secrets.token_urlsafe(32)}"


def empty_parameters() -> dict[str, Any]:
    return {"type": "object", "properties": {}}


# The built-ins' names, which a webhook tool may not take. The registry sits above this module
# (it resolves WebhookTools), so it hands its names down (ToolsConfig.ready) instead of being
# imported here.
_builtin_names: Callable[[], Container[str]] = frozenset


def builtin_names_source(names: Callable[[], Container[str]]) -> None:
    global _builtin_names
    _builtin_names = names


def tool_name_validator(value: str) -> None:
    if not TOOL_NAME_RE.match(value or ""):
        raise ValidationError("Use 1 to 64 letters, digits, underscores or hyphens.")
    if value in _builtin_names():
        raise ValidationError(f"'{value}' is a built-in tool's name.")


def parameters_validator(value: Any) -> None:
    try:
        schema_check(value)
    except SchemaInvalid as error:
        raise ValidationError(str(error)) from None


def webhook_url_validator(value: str) -> None:
    from .webhooks import url_refusal

    refusal = url_refusal(value)
    if refusal is not None:
        raise ValidationError(refusal[0].upper() + refusal[1:] + ".")


class WebhookTool(models.Model):
    """A tool the model may call, answered by the tenant's own HTTPS endpoint.

    Create and change through `tools.services` (validated, secret generated); assistants
    enable it by name."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="webhook_tools")
    name = models.CharField(max_length=64, validators=[tool_name_validator])
    description = models.TextField(max_length=1024, blank=True, default="")
    parameters = models.JSONField(default=empty_parameters, validators=[parameters_validator])
    url = models.URLField(max_length=500, validators=[webhook_url_validator])
    # Signs every call (HMAC-SHA256); encrypted at rest with FIELD_ENCRYPTION_KEYS.
    secret = EncryptedTextField(blank=True, default=webhook_secret_new)
    timeout_seconds = models.PositiveSmallIntegerField(
        default=10, validators=[MinValueValidator(1), MaxValueValidator(MAX_TIMEOUT_SECONDS)]
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="webhook_tool_unique_name"),
            models.CheckConstraint(
                condition=models.Q(timeout_seconds__gte=1, timeout_seconds__lte=MAX_TIMEOUT_SECONDS),
                name="webhook_tool_timeout_range",
            ),
        ]
        ordering = ["name"]

    @property
    def masked_secret(self) -> str:
        return mask(self.secret)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<WebhookTool {self.pk} {self.name} {self.url}>"
