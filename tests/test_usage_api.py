"""GET /api/v1/usage/: the tenant's ledger, totalled and grouped; nothing of other tenants."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.models import UsageRecord

pytestmark = pytest.mark.django_db


def _record(setup, *, model="gpt-4o-mini", user="alice", day=3, cost="0.01", prompt=100, completion=20):
    record = UsageRecord.objects.create(
        call_id=f"c-{UsageRecord.objects.count()}-{setup.tenant.pk}", tenant=setup.tenant,
        end_user=setup.end_user(user), model=model, prompt_tokens=prompt, completion_tokens=completion,
        cost_usd=Decimal(cost),
    )
    UsageRecord.objects.filter(pk=record.pk).update(created_at=datetime(2026, 11, day, 12, tzinfo=UTC))


@pytest.fixture
def ledger(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    _record(ours, day=3, cost="0.01")
    _record(ours, day=3, model="gpt-4o", user="bob", cost="0.20")
    _record(ours, day=5, cost="0.02", prompt=50)
    _record(theirs, day=3, cost="9.99")
    return ours


def _get(client, key, **params):
    return client.get("/api/v1/usage/", params, HTTP_AUTHORIZATION=f"Bearer {key}")


def test_totals_and_groups(client, ledger):
    window = {"start": "2026-11-01", "end": "2026-12-01"}
    body = _get(client, ledger.api_key, **window, group_by="model").json()
    totals = body["totals"]
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (3, 250, 60)
    assert totals["cost_usd"] == "0.23"
    assert {g["key"]: g["cost_usd"] for g in body["groups"]} == {"gpt-4o": "0.2", "gpt-4o-mini": "0.03"}

    by_day = _get(client, ledger.api_key, **window, group_by="day").json()["groups"]
    assert [(g["key"], g["requests"]) for g in by_day] == [("2026-11-03", 2), ("2026-11-05", 1)]

    by_user = _get(client, ledger.api_key, **window, group_by="end_user").json()["groups"]
    assert {g["key"]: g["requests"] for g in by_user} == {"alice": 2, "bob": 1}


def test_an_inverted_range_is_empty(client, ledger):
    body = _get(client, ledger.api_key, start="2026-11-05", end="2026-11-01").json()
    assert body["totals"]["requests"] == 0 and body["totals"]["cost_usd"] == "0"


def test_the_range_is_half_open_and_defaults_to_this_month(client, ledger):
    body = _get(client, ledger.api_key, start="2026-11-04", end="2026-11-05").json()
    assert body["totals"]["requests"] == 0
    assert _get(client, ledger.api_key, start="2026-11-05", end="2026-11-06").json()["totals"]["requests"] == 1


@pytest.mark.parametrize(
    "params",
    [{"group_by": "planet"}, {"start": "yesterday"}, {"end": "2026-13-01"}],
)
def test_bad_queries_are_400(client, ledger, params):
    response = _get(client, ledger.api_key, **params)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


def test_a_bad_key_is_401(client, ledger):
    assert _get(client, "pk_nope_nope").status_code == 401
    assert client.get("/api/v1/usage/").status_code == 401
