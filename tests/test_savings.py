"""What each cost lever saved, from the ledger: the cached-input saving booked by metering on
real calls, the other levers' savings passed to `call_book`, and their sums per month in
`GET /api/v1/usage/` and on the admin's usage page."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import openai
import pytest
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from billing.caps import Subject
from billing.metering import CallFacts, call_book, call_hold
from billing.models import UsageRecord
from billing.services import list_cost, price_for
from llm.gateway import Usage

MODEL = "gpt-4o-mini"
SYSTEM = " ".join(f"Rule {i}: answer the customer politely and check the order number." for i in range(120))
MILLION = Decimal(1_000_000)


def _usage(api_key: str, **params) -> dict:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    response = client.get("/api/v1/usage/", params)
    assert response.status_code == 200, response.json()
    return response.json()


@pytest.mark.django_db(transaction=True)
def test_cached_input_saving_is_booked_from_the_providers_cached_tokens(parley, tenant_factory, sim):
    setup = tenant_factory()
    client = openai.OpenAI(base_url=parley.openai_base_url, api_key=setup.api_key, max_retries=0)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is my order?"}]
    for _ in range(2):  # the second identical long prompt hits the simulator's prompt cache
        client.chat.completions.create(model=MODEL, messages=messages)
    first, second = UsageRecord.objects.filter(tenant=setup.tenant).order_by("created_at")
    price = price_for(MODEL)
    assert first.cached_tokens == 0 and first.saved_cached_input_usd == 0
    assert second.cached_tokens >= 1024
    assert second.saved_cached_input_usd == second.cached_tokens * (price.input - price.cached_input) / MILLION > 0
    assert second.cost_usd + second.saved_cached_input_usd == list_cost(
        price, prompt_tokens=second.prompt_tokens, completion_tokens=second.completion_tokens)

    [month] = _usage(setup.api_key)["months"]
    assert month["key"] == datetime.now(UTC).strftime("%Y-%m")
    assert Decimal(month["savings"]["cached_input"]) == second.saved_cached_input_usd
    assert Decimal(month["savings"]["total"]) == second.saved_cached_input_usd
    assert Decimal(month["list_cost"]) == first.cost_usd + second.cost_usd + second.saved_cached_input_usd
    assert all(Decimal(month["savings"][lever]) == 0 for lever in ("response_cache", "routing", "batch"))


def _book(setup, call_id: str, *, month: int, facts: CallFacts, prompt=1000, completion=200, cached=0, model=MODEL):
    subject = Subject(tenant_id=setup.tenant.pk, end_user_id=setup.end_user().pk)
    hold = call_hold(subject=subject, price=price_for(model), prompt_tokens=prompt, max_tokens=completion, call_id=call_id)
    record = call_book(hold=hold, usage=Usage(prompt, completion, cached), facts=facts)
    UsageRecord.objects.filter(pk=record.pk).update(created_at=datetime(2026, month, 10, tzinfo=UTC))
    return UsageRecord.objects.get(pk=record.pk)


@pytest.mark.django_db
def test_usage_sums_each_levers_saving_per_month_and_the_list_cost(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    strong, cheap = price_for("gpt-4o"), price_for(MODEL)
    # Routed to the cheap model: saved the strong model's list price minus the cheap one's.
    routing_saved = list_cost(strong, prompt_tokens=1000, completion_tokens=200) - list_cost(
        cheap, prompt_tokens=1000, completion_tokens=200)
    routed = _book(ours, "routed", month=10, facts=CallFacts(requested_model="gpt-4o", route="short",
                                                             saved_routing_usd=routing_saved))
    assert (routed.requested_model, routed.route, routed.saved_routing_usd) == ("gpt-4o", "short", routing_saved)
    batch_saved = Decimal("0.0004")
    batched = _book(ours, "batched", month=10, cached=512,
                    facts=CallFacts(kind=UsageRecord.Kind.BATCH, saved_batch_usd=batch_saved))
    assert batched.saved_cached_input_usd == 512 * (cheap.input - cheap.cached_input) / MILLION
    hit = UsageRecord.objects.create(
        call_id="hit", tenant=ours.tenant, kind=UsageRecord.Kind.CACHED, model=MODEL,
        saved_response_cache_usd=Decimal("0.002"),
    )
    UsageRecord.objects.filter(pk=hit.pk).update(created_at=datetime(2026, 11, 2, tzinfo=UTC))
    _book(theirs, "theirs", month=10, facts=CallFacts(saved_routing_usd=Decimal(5)))

    body = _usage(ours.api_key, start="2026-10-01", end="2026-12-01", group_by="model")
    october, november = body["months"]
    assert (october["key"], november["key"]) == ("2026-10", "2026-11")
    assert Decimal(october["savings"]["routing"]) == routing_saved
    assert Decimal(october["savings"]["batch"]) == batch_saved
    assert Decimal(october["savings"]["cached_input"]) == batched.saved_cached_input_usd
    assert Decimal(october["savings"]["response_cache"]) == 0
    october_saved = routing_saved + batch_saved + batched.saved_cached_input_usd
    assert Decimal(october["savings"]["total"]) == october_saved
    assert Decimal(october["list_cost"]) == routed.cost_usd + batched.cost_usd + october_saved
    assert Decimal(november["savings"]["response_cache"]) == Decimal("0.002") == Decimal(november["list_cost"])
    assert november["cost_usd"] == "0" and november["requests"] == 1
    totals = body["totals"]
    assert Decimal(totals["savings"]["total"]) == october_saved + Decimal("0.002")
    assert Decimal(totals["list_cost"]) == Decimal(october["list_cost"]) + Decimal(november["list_cost"])
    [group] = body["groups"]  # every row here is of one model
    assert group["savings"] == totals["savings"]


@pytest.mark.django_db
def test_admin_usage_page_shows_the_months_savings(tenant_factory):
    from tenants.services import owner_add

    setup = tenant_factory()
    now = datetime.now(UTC)
    record = _book(setup, "routed", month=now.month, facts=CallFacts(saved_routing_usd=Decimal("0.125")), cached=0)
    UsageRecord.objects.filter(pk=record.pk).update(created_at=now)
    owner = owner_add(tenant=setup.tenant, email="owner@savings.test", password="pw-123456789")
    client = Client()
    client.force_login(owner.user)
    body = client.get(reverse("admin:billing_usage")).content.decode()
    assert "Saved against list price" in body
    assert '<th class="savings-total">0.125000</th>' in body
    assert f'<td class="list-cost">{record.cost_usd + Decimal("0.125"):.6f}</td>' in body
