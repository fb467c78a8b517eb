"""Admin: each tenant's `/v1` model aliases, and the routes check the assistant form uses too."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin

from billing.models import ModelPrice
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
    def clean_name(self) -> str:
        name = self.cleaned_data["name"]
        if ModelPrice.objects.filter(model=name, tenant__isnull=True).exists():
            raise forms.ValidationError("This is the name of a priced model: an alias cannot take it.")
        return name

    def clean_default_model(self) -> str:
        model = self.cleaned_data["default_model"]
        if not ModelPrice.objects.filter(model=model, tenant__isnull=True).exists():
            raise forms.ValidationError("This model has no price in the price list.")
        return model

    def clean_routes(self) -> list[dict[str, Any]]:
        return routes_clean(self.cleaned_data.get("routes"))


@admin.register(ModelAlias)
class ModelAliasAdmin(TenantScopedAdmin):
    form = ModelAliasForm
    list_display = ("name", "default_model", "updated_at")
    search_fields = ("name", "default_model")
    ordering = ("name",)
