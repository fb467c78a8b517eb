"""Admin for webhook tools (tenant-scoped); the signing secret is write-only and shown once."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from tenants.admin_base import TenantScopedAdmin, TenantScopedForm

from .models import WebhookTool
from .services import webhook_secret_rotate


class WebhookToolForm(TenantScopedForm):
    """The model's validators check name, schema, URL and timeout (the same ones the services
    run). The secret is never rendered; blank keeps it, or generates one for a new tool."""

    url = forms.URLField(max_length=500, assume_scheme="https", label="URL")
    new_secret = forms.CharField(
        label="Signing secret",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave blank to keep the current secret (a new tool gets a generated one, shown once).",
    )

    class Meta:
        model = WebhookTool
        fields = ("tenant", "name", "description", "parameters", "url", "timeout_seconds", "is_active")

    def save(self, commit: bool = True) -> WebhookTool:
        new_secret = self.cleaned_data.get("new_secret")
        if new_secret:
            self.instance.secret = new_secret
        return super().save(commit=commit)


@admin.register(WebhookTool)
class WebhookToolAdmin(TenantScopedAdmin):
    form = WebhookToolForm
    list_display = ("name", "url", "timeout_seconds", "is_active", "masked_secret", "updated_at")
    list_filter = ("is_active",)
    search_fields = ("name", "url")
    readonly_fields = ("masked_secret", "created_at", "updated_at")
    actions = ("rotate_secret",)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list:
        fields = ["tenant", "name", "description", "parameters", "url", "timeout_seconds", "is_active"]
        if self.has_change_permission(request, obj) or (obj is None and self.has_add_permission(request)):
            fields.append("new_secret")
        if obj is not None:
            fields += ["masked_secret", "created_at", "updated_at"]
        return fields

    @admin.display(description="signing secret")
    def masked_secret(self, obj: WebhookTool) -> str:
        return obj.masked_secret or "(none)"

    def save_model(self, request: HttpRequest, obj: WebhookTool, form: forms.Form, change: bool) -> None:
        generated = not change and not form.cleaned_data.get("new_secret")
        super().save_model(request, obj, form, change)
        if generated:
            self._show_once(request, obj, obj.secret)

    @admin.action(description="Rotate the signing secret of selected tools", permissions=["change"])
    def rotate_secret(self, request: HttpRequest, queryset: QuerySet) -> None:
        for tool in self.editable(request, queryset):
            self._show_once(request, tool, webhook_secret_rotate(tool=tool))

    def _show_once(self, request: HttpRequest, tool: WebhookTool, secret: str) -> None:
        self.message_user(
            request,
            f"Signing secret of {tool.name}: {secret} — copy it now, it will not be shown again.",
            messages.WARNING,
        )
