"""Admin: each tenant's `/v1` model aliases, and the routes check the assistant form uses too."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin

from billing.services import model_priced
from tenants.admin_base import TenantScopedAdmin, TenantScopedForm

from .models import ModelAlias
from .rules import RoutesInvalid, routes_validate


def routes_clean(routes: Any) -> list[dict[str, Any]]:
    """Routes as a form field's value, checked. Raises forms.ValidationError saying what is wrong."""
    try:
        return routes_validate(routes if routes not in ("", None) else [])
    except RoutesInvalid as error:
        raise forms.ValidationError(str(error)) from None


class ModelAliasForm(TenantScopedForm):
    def clean(self) -> dict[str, Any]:
        """Priced for the alias's tenant: its own prices or the global list."""
        cleaned = super().clean()
        tenant = cleaned.get("tenant")
        tenant_id = tenant.pk if tenant is not None else self.instance.tenant_id or self._known_tenant_id()
        if cleaned.get("name") and model_priced(cleaned["name"], tenant_id=tenant_id):
            self.add_error("name", "This is the name of a priced model: an alias cannot take it.")
        if cleaned.get("default_model") and not model_priced(cleaned["default_model"], tenant_id=tenant_id):
            self.add_error("default_model", "This model has no price for this tenant.")
        return cleaned

    def clean_routes(self) -> list[dict[str, Any]]:
        return routes_clean(self.cleaned_data.get("routes"))


@admin.register(ModelAlias)
class ModelAliasAdmin(TenantScopedAdmin):
    form = ModelAliasForm
    list_display = ("name", "default_model", "updated_at")
    search_fields = ("name", "default_model")
    ordering = ("name",)
