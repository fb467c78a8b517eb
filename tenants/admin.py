"""Admin for tenants, members, end users, provider credentials and API keys (all tenant-scoped)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from llm.gateway import ProviderTarget
from llm.probe import providers_probe

from .admin_base import (
    AdminAccess,
    TenantScopedAdmin,
    TenantScopedForm,
    TenantScopedInline,
    admin_access,
    tenant_id_of,
)
from .egress import provider_url_refusal
from .freshness import config_changed
from .models import ApiKey, AuditEntry, EndUser, Membership, ProviderCredential, Tenant
from .origins import InvalidOrigin, origins_parse
from .services import api_key_create, api_keys_revoke, end_users_block

PROBE_LIMIT = 10


class MembershipInline(TenantScopedInline):
    """Who belongs to the tenant, at a glance; memberships are edited on their own page."""

    model = Membership
    read_only = True
    fields = ("user", "role", "created_at")
    readonly_fields = fields
    show_change_link = True


class OriginsField(forms.CharField):
    """A tenant's allowed origins, one a line; stored as a validated list."""

    widget = forms.Textarea(attrs={"rows": 3, "cols": 60})

    def prepare_value(self, value: Any) -> Any:
        return "\n".join(value) if isinstance(value, list) else value

    def clean(self, value: Any) -> list[str]:
        try:
            return origins_parse(str(value or "").split())
        except InvalidOrigin as error:
            raise forms.ValidationError(str(error)) from None


class TenantForm(TenantScopedForm):
    allowed_origins = OriginsField(
        required=False,
        help_text="Websites that may embed the chat widget, one a line: https://shop.example[:port], no path.",
    )

    class Meta:
        model = Tenant
        fields = "__all__"


@admin.register(Tenant)
class TenantAdmin(TenantScopedAdmin):
    """Members see their tenants; owners edit name and limits; only superusers add or delete."""

    list_display = ("slug", "name", "is_active", "end_user_rpm", "tenant_rpm", "tenant_tpm", "created_at")
    search_fields = ("slug", "name")
    ordering = ("slug",)
    fields = ("slug", "name", "is_active", "end_user_rpm", "tenant_rpm", "tenant_tpm", "allowed_origins", "created_at")
    readonly_fields = ("created_at",)
    inlines = (MembershipInline,)
    form = TenantForm

    def has_add_permission(self, request: HttpRequest) -> bool:
        return admin_access(request).is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return admin_access(request).is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        access = admin_access(request)
        if obj is None:
            return access.is_superuser or any(access.is_owner(tenant_id) for tenant_id in access.roles)
        return access.is_owner(obj.pk)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list:
        fields = list(super().get_readonly_fields(request, obj))
        if not admin_access(request).is_superuser:
            fields += ["slug", "is_active"]
        return fields


class MembershipForm(TenantScopedForm):
    access: AdminAccess | None = None  # the editor's rights, set per request by MembershipAdmin

    def clean_role(self) -> str:
        role = self.cleaned_data["role"]
        tenant = self.cleaned_data.get("tenant")
        tenant_id = tenant.pk if tenant is not None else tenant_id_of(self.instance)
        if role == Membership.Role.OWNER and not (self.access and self.access.is_owner(tenant_id)):
            raise forms.ValidationError("Only an owner can make someone an owner.")
        return role


@admin.register(Membership)
class MembershipAdmin(TenantScopedAdmin):
    """Owners and admins manage who belongs to their tenant; only owners touch owners.

    The user is chosen among people already in one of the editor's tenants: accounts are created
    by superusers or `create_tenant --owner-email`, so no tenant can browse everyone's accounts.
    """

    form = MembershipForm
    list_display = ("user", "role", "created_at")
    list_filter = ("role",)
    search_fields = ("user__username", "user__email")
    ordering = ("user__username",)
    fields = ("tenant", "user", "role", "created_at")
    readonly_fields = ("created_at",)
    list_select_related = ("user", "tenant")

    def get_form(self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any) -> type:
        form = super().get_form(request, obj, change=change, **kwargs)
        form.access = admin_access(request)  # MembershipForm.clean_role reads it
        return form

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list:
        fields = list(super().get_readonly_fields(request, obj))
        return fields + (["user"] if obj is not None else [])

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_change_permission(request, obj) and self._may_touch(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_delete_permission(request, obj) and self._may_touch(request, obj)

    def _may_touch(self, request: HttpRequest, obj: Membership | None) -> bool:
        if obj is None or obj.role != Membership.Role.OWNER:
            return True
        return admin_access(request).is_owner(obj.tenant_id)


def _tenants_changed(queryset: QuerySet) -> None:
    """A bulk update bypasses the signals: tell the configuration caches ourselves."""
    for tenant_id in set(queryset.values_list("tenant_id", flat=True)):
        config_changed(tenant_id)


@admin.register(EndUser)
class EndUserAdmin(TenantScopedAdmin):
    list_display = ("external_id", "is_blocked", "created_at")
    list_filter = ("is_blocked",)
    search_fields = ("external_id",)
    ordering = ("external_id",)
    fields = ("tenant", "external_id", "is_blocked", "created_at")
    readonly_fields = ("created_at",)
    actions = ("block", "unblock")

    @admin.action(description="Block selected end users (their requests answer unauthorized)", permissions=["change"])
    def block(self, request: HttpRequest, queryset: QuerySet) -> None:
        changed = end_users_block(end_users=self.editable(request, queryset), actor=request.user)
        self.message_user(request, f"Blocked {changed} end user(s).", messages.SUCCESS)

    def save_model(self, request: HttpRequest, obj: EndUser, form: forms.Form, change: bool) -> None:
        super().save_model(request, obj, form, change)
        if obj.is_blocked and "is_blocked" in form.changed_data:
            # A block from the change form does what the action does: close their sockets.
            end_users_block(end_users=EndUser.objects.filter(pk=obj.pk), actor=request.user)

    @admin.action(description="Unblock selected end users", permissions=["change"])
    def unblock(self, request: HttpRequest, queryset: QuerySet) -> None:
        changed = self.editable(request, queryset).update(is_blocked=False)
        _tenants_changed(queryset)
        self.message_user(request, f"Unblocked {changed} end user(s).", messages.SUCCESS)


class ProviderCredentialForm(TenantScopedForm):
    """The key is write-only: never rendered, never pre-filled; blank keeps the current one."""

    new_api_key = forms.CharField(
        label="API key",
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Write-only. Leave blank to keep the current key.",
    )

    def clean_base_url(self) -> str:
        # Checked again on every connection (DNS may change); this is the early, clear answer.
        url = self.cleaned_data["base_url"]
        refusal = provider_url_refusal(url)
        if refusal is not None:
            raise forms.ValidationError(
                f"This URL is refused: {refusal}. Provider URLs must be public unless the operator "
                "allows private ones (PROVIDER_ALLOW_PRIVATE_URLS, PROVIDER_ALLOWED_NETWORKS)."
            )
        return url

    def save(self, commit: bool = True) -> ProviderCredential:
        new_key = self.cleaned_data.get("new_api_key")
        if new_key:
            self.instance.api_key = new_key
        return super().save(commit=commit)


@admin.register(ProviderCredential)
class ProviderCredentialAdmin(TenantScopedAdmin):
    form = ProviderCredentialForm
    list_display = ("name", "base_url", "masked_key", "updated_at")
    search_fields = ("name", "base_url")
    ordering = ("name",)
    readonly_fields = ("masked_key", "updated_at", "created_at")
    actions = ("test_connection",)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list:
        fields = ["tenant", "name", "base_url", "organization"]
        if self.has_change_permission(request, obj) or (obj is None and self.has_add_permission(request)):
            fields.append("new_api_key")
        if obj is not None:
            fields += ["masked_key", "updated_at", "created_at"]
        return fields

    @admin.display(description="API key")
    def masked_key(self, obj: ProviderCredential) -> str:
        return obj.masked_key or "(none)"

    @admin.action(description="Test connection (lists the provider's models)", permissions=["change"])
    def test_connection(self, request: HttpRequest, queryset: QuerySet) -> None:
        credentials = list(self.editable(request, queryset).order_by("pk")[:PROBE_LIMIT])
        targets = [
            ProviderTarget(credential_id=c.pk, base_url=c.base_url, api_key=c.api_key, organization=c.organization)
            for c in credentials
        ]
        names = {c.pk: f"{c.name} ({c.base_url})" for c in credentials}
        for result in providers_probe(targets):
            level = messages.SUCCESS if result.ok else messages.ERROR
            verdict = "connected" if result.ok else "failed"
            self.message_user(request, f"{names[result.credential_id]}: {verdict}: {result.detail}", level)


@admin.register(ApiKey)
class ApiKeyAdmin(TenantScopedAdmin):
    """Keys are made by `api_key_create`: the plaintext is shown once, in a message; only the
    prefix and a hash are stored, and the hash is never displayed."""

    list_display = ("display_prefix", "name", "response_cache", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at", "response_cache")
    search_fields = ("name", "prefix")
    ordering = ("-created_at",)
    actions = ("revoke",)

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list:
        fields = ["tenant", "name", "allowed_models", "rpm", "response_cache"]
        if obj is not None:
            fields += ["display_prefix", "created_at", "last_used_at", "revoked_at"]
        return fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list:
        fields = list(super().get_readonly_fields(request, obj))
        return fields + ["display_prefix", "created_at", "last_used_at", "revoked_at"]

    @admin.display(description="key", ordering="prefix")
    def display_prefix(self, obj: ApiKey) -> str:
        return f"pk_{obj.prefix}_…"

    def save_model(self, request: HttpRequest, obj: ApiKey, form: forms.Form, change: bool) -> None:
        if change:
            return super().save_model(request, obj, form, change)
        self.assign_tenant(request, obj)
        issued = api_key_create(tenant=obj.tenant, name=obj.name, actor=request.user)
        ApiKey.objects.filter(pk=issued.api_key.pk).update(
            allowed_models=obj.allowed_models, rpm=obj.rpm, response_cache=obj.response_cache
        )
        config_changed(issued.api_key.tenant_id)
        obj.pk = issued.api_key.pk
        obj.refresh_from_db()
        self.message_user(
            request,
            f"Copy this API key now, it will not be shown again: {issued.plaintext}",
            messages.WARNING,
        )

    @admin.action(description="Revoke selected API keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet) -> None:
        revoked = api_keys_revoke(keys=self.editable(request, queryset), actor=request.user)
        self.message_user(request, f"Revoked {revoked} API key(s).", messages.SUCCESS)


@admin.register(AuditEntry)
class AuditEntryAdmin(TenantScopedAdmin):
    """Each tenant's own trail: who changed what, when (values of secrets are never recorded)."""

    read_only = True
    list_display = ("created_at", "actor_label", "action", "object_type", "object_repr")
    list_filter = ("action", "object_type")
    search_fields = ("actor_label", "object_repr", "object_id")
    ordering = ("-created_at",)
