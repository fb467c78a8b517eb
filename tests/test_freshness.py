"""Configuration versions: each app registers the models whose saves bump the tenant version."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest

from billing.models import ModelPrice, SpendingCap
from moderation.models import ModerationPolicy
from tenants import freshness
from tenants.freshness import versions_read

pytestmark = pytest.mark.django_db


def test_every_app_registers_its_watched_models():
    assert freshness.watched() == {
        "tenants.Tenant": "pk",
        "tenants.ApiKey": "tenant_id",
        "tenants.EndUser": "tenant_id",
        "tenants.ProviderCredential": "tenant_id",
        "conversations.Assistant": "tenant_id",
        "billing.SpendingCap": "tenant_id",
        "moderation.ModerationPolicy": "tenant_id",
        "billing.ModelPrice": "tenant_id",  # None on a global row: every tenant's
        "routing.ModelAlias": "tenant_id",
    }


def test_tenants_names_no_higher_app():
    source = (Path(__file__).resolve().parent.parent / "tenants" / "freshness.py").read_text()
    assert not re.search(r"\b(conversations|billing|moderation|tools|compat)\b\.", source)


def test_a_higher_apps_save_bumps_its_tenants_version(tenant_factory):
    setup = tenant_factory()
    tenant_id = setup.tenant.pk
    before = versions_read(tenant_id)

    setup.assistant.max_tokens += 1
    setup.assistant.save()
    after_assistant = versions_read(tenant_id)
    assert after_assistant[0] != before[0] and after_assistant[1] == before[1]

    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("5"))
    after_cap = versions_read(tenant_id)
    assert after_cap[0] != after_assistant[0]

    ModerationPolicy.objects.update_or_create(tenant=setup.tenant, defaults={})
    assert versions_read(tenant_id)[0] != after_cap[0]


def test_a_price_change_bumps_every_tenants_version(tenant_factory):
    setup = tenant_factory()
    before = versions_read(setup.tenant.pk)
    price = ModelPrice.objects.first()
    price.output_per_million += 1
    price.save()
    after = versions_read(setup.tenant.pk)
    assert after[1] != before[1] and after[0] == before[0]


def test_a_new_end_user_changes_nothing(tenant_factory):
    setup = tenant_factory()
    before = versions_read(setup.tenant.pk)
    setup.end_user("someone-new")
    assert versions_read(setup.tenant.pk) == before
