"""The tenant-scoped admin: what a signed-in user sees and may change is decided by Membership.

Every admin of a tenant-owned model subclasses `TenantScopedAdmin` (inlines: `TenantScopedInline`).
Querysets, change/delete/history views, foreign-key and many-to-many choices, autocomplete,
search, list filters, actions and inlines all start from `scope()`, so another tenant's object
is simply not there: its URLs answer exactly like a missing object's. Rights come from the
user's role in the object's tenant (owner and admin edit, member reads), never from Django's
per-model permission table; superusers see and edit everything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.admin.filters import RelatedFieldListFilter
from django.contrib.auth import get_user_model
from django.core.exceptions import FieldDoesNotExist, PermissionDenied
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest

from .models import Membership, Tenant

EDITOR_ROLES = frozenset({Membership.Role.OWNER, Membership.Role.ADMIN})
_CACHE_ATTR = "_parley_admin_access"


@dataclass(frozen=True)
class AdminAccess:
    """One signed-in user's rights: their role in each tenant they belong to."""

    is_superuser: bool
    roles: dict[int, str]

    @property
    def tenant_ids(self) -> frozenset[int]:
        return frozenset(self.roles)

    @property
    def editable_ids(self) -> frozenset[int]:
        return frozenset(tenant_id for tenant_id, role in self.roles.items() if role in EDITOR_ROLES)

    def can_view(self, tenant_id: int | None) -> bool:
        return self.is_superuser or tenant_id in self.roles

    def can_edit(self, tenant_id: int | None) -> bool:
        return self.is_superuser or tenant_id in self.editable_ids

    def is_owner(self, tenant_id: int | None) -> bool:
        return self.is_superuser or self.roles.get(tenant_id) == Membership.Role.OWNER  # type: ignore[arg-type]


def admin_access(request: HttpRequest) -> AdminAccess:
    """The signed-in user's AdminAccess, read once per request."""
    cached = getattr(request, _CACHE_ATTR, None)
    if cached is not None:
        return cached
    user = request.user
    if not (user.is_active and user.is_staff):
        access = AdminAccess(is_superuser=False, roles={})
    elif user.is_superuser:
        access = AdminAccess(is_superuser=True, roles={})
    else:
        roles = dict(Membership.objects.filter(user_id=user.pk).values_list("tenant_id", "role"))
        access = AdminAccess(is_superuser=False, roles=roles)
    setattr(request, _CACHE_ATTR, access)
    return access


# --- which tenant a model or object belongs to ---------------------------------------------


def tenant_lookup(model: type[models.Model]) -> str | None:
    """The lookup that names a row's tenant: `pk` for Tenant, `tenant` for tenant-owned models."""
    if issubclass(model, Tenant):
        return "pk"
    field = _field_or_none(model, "tenant")
    return "tenant" if field is not None and field.related_model is Tenant else None


def tenant_id_of(obj: models.Model | None) -> int | None:
    if obj is None:
        return None
    if isinstance(obj, Tenant):
        return obj.pk
    return getattr(obj, "tenant_id", None)


def scope(queryset: QuerySet, access: AdminAccess, *, editable: bool = False) -> QuerySet:
    """Rows of `queryset` the user may see (or edit). Users are scoped to co-members; models
    that belong to no tenant (prices, content types) pass through unchanged."""
    if access.is_superuser:
        return queryset
    ids = access.editable_ids if editable else access.tenant_ids
    lookup = tenant_lookup(queryset.model)
    if lookup is not None:
        return queryset.filter(**{f"{lookup}__in": ids})
    if issubclass(queryset.model, get_user_model()):
        return queryset.filter(memberships__tenant_id__in=ids).distinct()
    return queryset


# --- forms ----------------------------------------------------------------------------------


class TenantScopedForm(forms.ModelForm):
    """Keeps every related choice inside the object's own tenant.

    A user of several tenants is offered all of theirs; this form narrows the choices once the
    object's tenant is known and refuses a mix (an assistant of one tenant with another's key).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        tenant_id = self._known_tenant_id()
        if tenant_id is None:
            return
        for name, field in self.fields.items():
            if name != "tenant" and isinstance(field, forms.ModelChoiceField):
                lookup = tenant_lookup(field.queryset.model)
                if lookup is not None:
                    field.queryset = field.queryset.filter(**{lookup: tenant_id})

    def _known_tenant_id(self) -> int | None:
        field = self.fields.get("tenant")
        if field is not None and field.disabled and field.initial is not None:
            return getattr(field.initial, "pk", field.initial)
        return tenant_id_of(self.instance)

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        _json_defaults(self.instance, cleaned)
        tenant = cleaned.get("tenant")
        tenant_id = tenant.pk if isinstance(tenant, Tenant) else tenant_id_of(self.instance)
        if tenant_id is None:
            return cleaned
        for name, value in list(cleaned.items()):
            if name != "tenant" and any(_foreign(item, tenant_id) for item in _items(value)):
                self.add_error(name, "Choose from this tenant's own objects.")
        return cleaned


def _json_defaults(instance: models.Model, cleaned: dict[str, Any]) -> None:
    """A cleared JSON box means the field's default (`[]`), not NULL in a NOT NULL column."""
    for field in instance._meta.concrete_fields:
        if isinstance(field, models.JSONField) and not field.null and field.name in cleaned:
            if cleaned[field.name] is None:
                cleaned[field.name] = field.get_default()


def _items(value: Any) -> Iterable[Any]:
    return value if isinstance(value, (QuerySet, list, tuple)) else (value,)


def _foreign(item: Any, tenant_id: int) -> bool:
    if not isinstance(item, models.Model) or tenant_lookup(type(item)) is None:
        return False
    return tenant_id_of(item) != tenant_id


class ScopedRelatedFilter(RelatedFieldListFilter):
    """A list filter on a foreign key that offers only the user's tenants' rows."""

    def field_choices(self, field: Any, request: HttpRequest, model_admin: admin.ModelAdmin) -> list:
        access = admin_access(request)
        related = field.related_model
        limit: dict[str, Any] = {}
        lookup = tenant_lookup(related)
        if not access.is_superuser and lookup is not None:
            limit = {f"{lookup}__in": access.tenant_ids}
        ordering = self.field_admin_ordering(field, request, model_admin)
        return field.get_choices(include_blank=False, limit_choices_to=limit, ordering=ordering)


# --- admin classes --------------------------------------------------------------------------


class _TenantScoping:
    """What admins and inlines share: scoped rows, scoped choices, rights from Membership.

    `read_only` marks ledgers and logs: nobody adds, changes or deletes them, superusers included.
    """

    read_only = False

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return scope(super().get_queryset(request), admin_access(request))  # type: ignore[misc]

    def formfield_for_foreignkey(self, db_field: models.ForeignKey, request: HttpRequest, **kwargs: Any):
        formfield = super().formfield_for_foreignkey(db_field, request, **kwargs)  # type: ignore[misc]
        if formfield is not None and hasattr(formfield, "queryset"):
            editable = db_field.related_model is Tenant
            formfield.queryset = scope(formfield.queryset, admin_access(request), editable=editable)
        return formfield

    def formfield_for_manytomany(self, db_field: models.ManyToManyField, request: HttpRequest, **kwargs: Any):
        formfield = super().formfield_for_manytomany(db_field, request, **kwargs)  # type: ignore[misc]
        if formfield is not None and hasattr(formfield, "queryset"):
            formfield.queryset = scope(formfield.queryset, admin_access(request))
        return formfield

    def has_view_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        access = admin_access(request)
        if obj is None:
            return access.is_superuser or bool(access.roles)
        return access.can_view(tenant_id_of(obj))

    def has_add_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return not self.read_only and self._can_edit(request, obj)

    def has_change_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return not self.read_only and self._can_edit(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj: models.Model | None = None) -> bool:
        return not self.read_only and self._can_edit(request, obj)

    def _can_edit(self, request: HttpRequest, obj: models.Model | None) -> bool:
        access = admin_access(request)
        if obj is None:
            return access.is_superuser or bool(access.editable_ids)
        return access.can_edit(tenant_id_of(obj))


class TenantScopedAdmin(_TenantScoping, admin.ModelAdmin):
    """Base ModelAdmin for every tenant-owned model (see the module docstring)."""

    form = TenantScopedForm
    view_on_site = False
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}

    def has_module_permission(self, request: HttpRequest) -> bool:
        access = admin_access(request)
        return access.is_superuser or bool(access.roles)

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str):
        # Autocomplete and the changelist both pass the scoped queryset; scope again anyway so
        # no caller can search outside the user's tenants.
        queryset = scope(queryset, admin_access(request))
        return super().get_search_results(request, queryset, search_term)

    def get_list_filter(self, request: HttpRequest) -> list:
        filters = [self._scoped_filter(item) for item in super().get_list_filter(request)]
        if self._spans_tenants(request) and tenant_lookup(self.model) == "tenant":
            filters.insert(0, ("tenant", ScopedRelatedFilter))
        return filters

    def _scoped_filter(self, item: Any) -> Any:
        if isinstance(item, str):
            field = _field_or_none(self.model, item)
            if field is not None and field.is_relation:
                return (item, ScopedRelatedFilter)
        return item

    def get_list_display(self, request: HttpRequest) -> list:
        columns = list(super().get_list_display(request))
        if self._spans_tenants(request) and tenant_lookup(self.model) == "tenant" and "tenant" not in columns:
            columns.insert(1, "tenant")
        return columns

    def get_readonly_fields(self, request: HttpRequest, obj: models.Model | None = None) -> list:
        fields = list(super().get_readonly_fields(request, obj))
        # Objects never move between tenants.
        if obj is not None and tenant_lookup(self.model) == "tenant" and "tenant" not in fields:
            fields.append("tenant")
        return fields

    def formfield_for_foreignkey(self, db_field: models.ForeignKey, request: HttpRequest, **kwargs: Any):
        formfield = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if db_field.name == "tenant" and formfield is not None:
            _fix_single_tenant(formfield, admin_access(request))
        return formfield

    def save_model(self, request: HttpRequest, obj: models.Model, form: forms.Form, change: bool) -> None:
        if not change:
            self.assign_tenant(request, obj)
        super().save_model(request, obj, form, change)

    # --- the audit trail: every admin write, attributed, in the object's tenant ----------

    def _audit(self, request: HttpRequest, obj: models.Model, action: str, changes: Any) -> None:
        from .audit import audit_record

        tenant_id = tenant_id_of(obj) if tenant_lookup(type(obj)) else None
        audit_record(tenant_id=tenant_id, action=action, actor=request.user, obj=obj, changes=changes)

    def log_addition(self, request: HttpRequest, obj: models.Model, message: Any):
        self._audit(request, obj, "admin.add", message)
        return super().log_addition(request, obj, message)

    def log_change(self, request: HttpRequest, obj: models.Model, message: Any):
        self._audit(request, obj, "admin.change", message)
        return super().log_change(request, obj, message)

    def log_deletions(self, request: HttpRequest, queryset: QuerySet):
        for obj in queryset:
            self._audit(request, obj, "admin.delete", [])
        return super().log_deletions(request, queryset)

    def assign_tenant(self, request: HttpRequest, obj: models.Model) -> None:
        """A new object belongs to the user's one tenant, or to one they chose and may edit."""
        if tenant_lookup(type(obj)) != "tenant":
            return
        access = admin_access(request)
        if obj.tenant_id is None and len(access.editable_ids) == 1:  # type: ignore[attr-defined]
            obj.tenant_id = next(iter(access.editable_ids))  # type: ignore[attr-defined]
        if not access.can_edit(tenant_id_of(obj)):
            raise PermissionDenied

    def editable(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        """The part of an action's selection the user may change (roles differ per tenant)."""
        if self.read_only:
            return queryset.none()
        return scope(queryset, admin_access(request), editable=True)

    def _spans_tenants(self, request: HttpRequest) -> bool:
        access = admin_access(request)
        return access.is_superuser or len(access.roles) > 1


class TenantScopedInline(_TenantScoping, admin.TabularInline):
    """Inline rows of a tenant-owned parent: same scoping; rights follow the parent's tenant.
    (The inlines in use are read-only; an editable one of a tenant-owned child would also need
    the parent's tenant assigned to new rows in `save_formset`.)"""

    extra = 0
    view_on_site = False


def _fix_single_tenant(formfield: forms.Field, access: AdminAccess) -> None:
    """A user who edits exactly one tenant never picks it: the field is fixed and hidden, yet
    still part of the form, so unique constraints with the tenant are validated."""
    if access.is_superuser or len(access.editable_ids) != 1:
        return
    tenant_id = next(iter(access.editable_ids))
    formfield.initial = tenant_id
    formfield.disabled = True
    formfield.widget = forms.HiddenInput()


def _field_or_none(model: type[models.Model], name: str) -> Any:
    try:
        return model._meta.get_field(name)
    except FieldDoesNotExist:
        return None
