"""ModelAlias: a tenant's `/v1` model name (e.g. `auto`) that routes like an assistant does."""

from __future__ import annotations

from django.db import models

from tenants.models import TenantManager


class ModelAlias(models.Model):
    """`model: "<name>"` on `/v1` is answered by the first matching route's model, else
    `default_model`; the ledger keeps the alias as the requested model."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="model_aliases")
    name = models.CharField(max_length=100)
    default_model = models.CharField(max_length=100)
    # Ordered routes, first match wins (routing/rules.py): [{"name", "model", "when": {...}}].
    routes = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TenantManager()

    class Meta:
        verbose_name_plural = "model aliases"
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="model_alias_unique_name")]

    def __str__(self) -> str:
        return self.name
