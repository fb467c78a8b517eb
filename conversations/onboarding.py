"""Tenant onboarding: a tenant with everything it needs to chat, in one transaction."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.db import transaction

from billing.models import SpendingCap
from billing.services import price_for
from tenants.models import Tenant
from tenants.services import api_key_create, tenant_create

from .models import Assistant

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class Onboarded:
    tenant: Tenant
    assistant: Assistant
    api_key: str  # plaintext, shown once


@transaction.atomic
def tenant_onboard(
    *,
    slug: str,
    name: str = "",
    model: str = "gpt-4o-mini",
    provider_base_url: str,
    provider_key: str = "",
    monthly_cap_usd: Decimal | None = None,
    user_rpm: int | None = None,
    tenant_rpm: int | None = None,
    tenant_tpm: int | None = None,
    tools: list[str] | None = None,
    owner_email: str | None = None,
    owner_password: str | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> Onboarded:
    """Raises PriceMissing for a model without a price, IntegrityError for a taken slug."""
    price_for(model)
    tenant, credential = tenant_create(
        slug=slug,
        name=name,
        provider_base_url=provider_base_url,
        provider_key=provider_key,
        owner_email=owner_email,
        owner_password=owner_password,
    )
    limits = {"end_user_rpm": user_rpm, "tenant_rpm": tenant_rpm, "tenant_tpm": tenant_tpm}
    limits = {field: value for field, value in limits.items() if value is not None}
    if limits:
        for field, value in limits.items():
            setattr(tenant, field, value)
        tenant.save(update_fields=list(limits))
    assistant = Assistant.objects.create(
        tenant=tenant,
        slug="default",
        name=name or slug,
        model=model,
        system_prompt=system_prompt,
        credential=credential,
        tools=sorted(set(tools or [])),
        is_default=True,
    )
    if monthly_cap_usd is not None:
        SpendingCap.objects.create(
            tenant=tenant,
            scope=SpendingCap.Scope.TENANT,
            period=SpendingCap.Period.MONTH,
            limit_usd=monthly_cap_usd,
            alert_thresholds=[50, 80, 100],
        )
    issued = api_key_create(tenant=tenant)
    return Onboarded(tenant=tenant, assistant=assistant, api_key=issued.plaintext)
