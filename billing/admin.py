"""Admin for billing: the global price list, tenant-scoped caps, alerts, the usage ledger and its usage page."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from tenants.admin_base import TenantScopedAdmin, TenantScopedForm, admin_access, scope
from tenants.models import Tenant

from .caps import period_bounds
from .models import CapAlert, CapPeriod, ModelPrice, Reservation, SpendingCap, TenantModelPrice, UsageRecord
from .usage_report import month_usage

DEFAULT_ALERT_THRESHOLDS = [50, 80, 100]
CURRENT_PERIODS_SHOWN = 10
TENANT_SWITCHER_LIMIT = 500


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """The global price list: every tenant member may read it, only superusers edit it. (A
    tenant's own prices are `TenantModelPriceAdmin`'s.)"""

    exclude = ("tenant",)
    list_display = (
        "model",
        "input_per_million",
        "cached_input_per_million",
        "output_per_million",
        "batch_input_per_million",
        "batch_output_per_million",
        "context_window",
        "updated_at",
    )
    search_fields = ("model",)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return super().get_queryset(request).filter(tenant__isnull=True)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.has_view_permission(request)

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        access = admin_access(request)
        return access.is_superuser or bool(access.roles) or super().has_view_permission(request, obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return admin_access(request).is_superuser

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return admin_access(request).is_superuser

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return admin_access(request).is_superuser


class TenantPriceForm(TenantScopedForm):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "tenant" in self.fields:
            self.fields["tenant"].required = True  # a row without a tenant would be a global price


@admin.register(TenantModelPrice)
class TenantModelPriceAdmin(TenantScopedAdmin):
    """A tenant's owners and admins price models for their tenant (self-hosted at $0, a newer
    model, a negotiated rate); the row overrides the global price for that tenant only."""

    form = TenantPriceForm
    list_display = ("model", "kind", "input_per_million", "cached_input_per_million", "output_per_million",
                    "batch_input_per_million", "batch_output_per_million", "context_window", "updated_at")
    search_fields = ("model",)
    ordering = ("model",)


class SpendingCapForm(TenantScopedForm):
    def clean_alert_thresholds(self) -> list[int]:
        thresholds = self.cleaned_data.get("alert_thresholds") or []
        if not isinstance(thresholds, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 < t <= 100 for t in thresholds
        ):
            raise forms.ValidationError("A list of whole percentages from 1 to 100, e.g. [50, 80, 100].")
        return sorted(set(thresholds))

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        scope_, end_user, api_key = cleaned.get("scope"), cleaned.get("end_user"), cleaned.get("api_key")
        if end_user is not None and scope_ != SpendingCap.Scope.END_USER:
            self.add_error("end_user", "Only an end-user cap names an end user.")
        if api_key is not None and scope_ != SpendingCap.Scope.API_KEY:
            self.add_error("api_key", "Only an API-key cap names an API key.")
        return cleaned


@admin.register(SpendingCap)
class SpendingCapAdmin(TenantScopedAdmin):
    """Hard caps. An end-user or API-key cap without a specific one applies to each separately."""

    form = SpendingCapForm
    list_display = ("scope", "period", "limit_usd", "applies_to", "alert_thresholds", "created_at")
    list_filter = ("scope", "period")
    search_fields = ("end_user__external_id", "api_key__name")
    ordering = ("scope", "period", "id")
    autocomplete_fields = ("end_user", "api_key")
    fields = ("tenant", "scope", "end_user", "api_key", "period", "limit_usd", "alert_thresholds")
    list_select_related = ("end_user", "api_key", "tenant")

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list:
        return list(self.fields) + (["current_periods"] if obj is not None else [])

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list:
        return list(super().get_readonly_fields(request, obj)) + ["current_periods"]

    def get_changeform_initial_data(self, request: HttpRequest) -> dict[str, Any]:
        return {"alert_thresholds": DEFAULT_ALERT_THRESHOLDS, **super().get_changeform_initial_data(request)}

    @admin.display(description="applies to")
    def applies_to(self, cap: SpendingCap) -> str:
        if cap.scope == SpendingCap.Scope.END_USER:
            return cap.end_user.external_id if cap.end_user else "each end user"
        if cap.scope == SpendingCap.Scope.API_KEY:
            return str(cap.api_key) if cap.api_key else "each API key"
        return "the whole tenant"

    @admin.display(description="this period")
    def current_periods(self, cap: SpendingCap) -> str:
        start, _ = period_bounds(cap.period, timezone.now())
        rows = CapPeriod.objects.for_tenant(cap.tenant_id).filter(cap=cap, period_start=start)
        rows = rows.order_by("-spent_usd")[:CURRENT_PERIODS_SHOWN]
        if not rows:
            return "Nothing spent yet."
        return format_html(
            "<table><tr><th>subject</th><th>spent</th><th>held</th><th>limit</th></tr>{}</table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>${}</td><td>${}</td><td>${}</td></tr>",
                (
                    (p.subject or "tenant", _money(p.spent_usd), _money(p.reserved_usd), _money(p.limit_usd))
                    for p in rows
                ),
            ),
        )


@admin.register(CapAlert)
class CapAlertAdmin(TenantScopedAdmin):
    """Thresholds crossed: the notice in the admin that goes with the alert email."""

    read_only = True
    list_display = ("created_at", "cap", "threshold", "spent_usd", "subject", "period_start")
    list_filter = ("threshold",)
    search_fields = ("subject",)
    list_select_related = ("cap", "tenant")


@admin.register(Reservation)
class ReservationAdmin(TenantScopedAdmin):
    read_only = True
    list_display = ("created_at", "call_id", "status", "amount_usd", "actual_usd", "settled_at")
    list_filter = ("status",)
    search_fields = ("call_id",)
    ordering = ("-created_at",)
    show_full_result_count = False


@admin.register(UsageRecord)
class UsageRecordAdmin(TenantScopedAdmin):
    """The append-only ledger: read here, never written. Its usage page charts a month of spend."""

    read_only = True
    list_display = (
        "created_at", "kind", "outcome", "model", "end_user",
        "prompt_tokens", "cached_tokens", "completion_tokens", "cost_usd", "estimated",
    )
    list_filter = ("kind", "outcome", "estimated")
    search_fields = ("model", "call_id", "end_user__external_id")
    ordering = ("-created_at",)
    list_select_related = ("end_user", "tenant")
    date_hierarchy = "created_at"
    show_full_result_count = False

    def get_urls(self) -> list:
        usage = path("usage/", self.admin_site.admin_view(self.usage_view), name="billing_usage")
        return [usage, *super().get_urls()]

    def usage_view(self, request: HttpRequest) -> HttpResponse:
        """One tenant's month: daily spend against the monthly cap, by model, top end users."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        tenants = scope(Tenant.objects.order_by("slug"), admin_access(request))
        tenant = _chosen_tenant(tenants, request.GET.get("tenant"))
        month = _chosen_month(request.GET.get("month"))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": f"Usage: {tenant.name}" if tenant else "Usage",
            "tenant": tenant,
            "tenants": list(tenants[:TENANT_SWITCHER_LIMIT]),
            "month": month,
            "previous_month": _shift_month(month, -1),
            "next_month": _shift_month(month, 1) if month < _this_month() else None,
            "report": month_usage(tenant_id=tenant.pk, month=month) if tenant else None,
        }
        return TemplateResponse(request, "admin/billing/usage.html", context)


def _chosen_tenant(tenants: QuerySet, slug: str | None) -> Tenant | None:
    """The tenant asked for (a foreign slug answers like an unknown one), else the first."""
    if slug:
        tenant = tenants.filter(slug=slug).first()
        if tenant is None:
            raise Http404("No such tenant.")
        return tenant
    return tenants.first()


def _this_month() -> date:
    return timezone.now().date().replace(day=1)


def _chosen_month(value: str | None) -> date:
    try:
        year, month = (int(part) for part in (value or "").split("-"))
        chosen = date(year, month, 1)
    except ValueError:
        return _this_month()
    return chosen if chosen.year >= 2000 else _this_month()


def _shift_month(month: date, delta: int) -> date:
    index = month.year * 12 + month.month - 1 + delta
    return date(index // 12, index % 12 + 1, 1)


def _money(amount: Decimal) -> str:
    return f"{amount.quantize(Decimal('0.0001'))}"
