"""Tenant prices: a tenant's row overrides the global price for that tenant only, on every
surface (socket, REST, /v1) and in the ledger; an unpriced model is refused, an explicit zero
books $0; the prices REST API and the tenant-scoped admin."""

from __future__ import annotations

from decimal import Decimal

import httpx2
import openai
import pytest
from django.test import Client
from rest_framework.test import APIClient

from billing.models import ModelPrice, TenantModelPrice, UsageRecord
from billing.services import PriceMissing, price_for
from conversations.models import Assistant
from tenants.models import AuditEntry
from tests.conftest import adb

MODEL = "gpt-4o-mini"
SELF_HOSTED = "meta-llama/Llama-3-8B"


def _price(tenant, model: str, input_: str, output: str, cached: str | None = None) -> ModelPrice:
    return ModelPrice.objects.create(
        tenant=tenant, model=model, input_per_million=Decimal(input_), output_per_million=Decimal(output),
        cached_input_per_million=Decimal(cached or input_), batch_input_per_million=Decimal(input_),
        batch_output_per_million=Decimal(output),
    )


def _api(api_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    return client


def _sdk(parley, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=parley.openai_base_url, api_key=api_key, max_retries=0)


def _records(tenant) -> list[UsageRecord]:
    return list(UsageRecord.objects.filter(tenant=tenant).order_by("created_at"))


# --- price_for ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_tenant_price_overrides_the_global_one_for_that_tenant_only(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    _price(ours.tenant, MODEL, "1", "2")
    assert (price_for(MODEL, tenant_id=ours.tenant.pk).input, price_for(MODEL, tenant_id=ours.tenant.pk).output) == (
        Decimal(1), Decimal(2))
    assert price_for(MODEL, tenant_id=theirs.tenant.pk) == price_for(MODEL)  # the global list
    assert price_for(MODEL).input == Decimal("0.30")
    # A dated snapshot is priced as the tenant's family row too.
    assert price_for(f"{MODEL}-2024-07-18", tenant_id=ours.tenant.pk).input == Decimal(1)


@pytest.mark.django_db
def test_a_model_priced_by_another_tenant_is_unpriced_here(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    _price(theirs.tenant, SELF_HOSTED, "0", "0")
    with pytest.raises(PriceMissing):
        price_for(SELF_HOSTED, tenant_id=ours.tenant.pk)
    with pytest.raises(PriceMissing):
        price_for(SELF_HOSTED)
    assert price_for(SELF_HOSTED, tenant_id=theirs.tenant.pk).input == 0


# --- the ledger, through real calls -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_v1_books_the_tenant_price_and_another_tenant_still_pays_global(parley, tenant_factory, sim):
    ours, theirs = tenant_factory(), tenant_factory()
    _price(ours.tenant, MODEL, "100", "200")  # a negotiated (here: steep) rate, for the arithmetic
    for setup in (ours, theirs):
        _sdk(parley, setup.api_key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    [mine], [other] = _records(ours.tenant), _records(theirs.tenant)
    assert mine.cost_usd == (mine.prompt_tokens * 100 + mine.completion_tokens * 200) / Decimal(1_000_000)
    assert other.cost_usd == price_for(MODEL).cost(prompt_tokens=other.prompt_tokens,
                                                   completion_tokens=other.completion_tokens)
    assert other.cost_usd < mine.cost_usd


@pytest.mark.django_db(transaction=True)
def test_v1_explicit_zero_books_dollar_zero_rows_and_lists_the_model(parley, tenant_factory, sim):
    ours, theirs = tenant_factory(), tenant_factory()
    client = _sdk(parley, ours.api_key)
    with pytest.raises(openai.NotFoundError):  # unpriced: refused, never free
        client.chat.completions.create(model=SELF_HOSTED, messages=[{"role": "user", "content": "Hi"}])
    assert _records(ours.tenant) == []

    created = _api(ours.api_key).post("/api/v1/prices/", {"model": SELF_HOSTED, "input_per_million": "0",
                                                          "output_per_million": "0"}, format="json")
    assert created.status_code == 201, created.json()
    reply = client.chat.completions.create(model=SELF_HOSTED, messages=[{"role": "user", "content": "Hi"}])
    [record] = _records(ours.tenant)
    assert record.model == SELF_HOSTED and record.prompt_tokens == reply.usage.prompt_tokens > 0
    assert record.cost_usd == 0 and record.completion_tokens > 0
    assert SELF_HOSTED in [m.id for m in client.models.list()]
    assert SELF_HOSTED not in [m.id for m in _sdk(parley, theirs.api_key).models.list()]
    with pytest.raises(openai.NotFoundError):
        _sdk(parley, theirs.api_key).chat.completions.create(model=SELF_HOSTED, messages=[{"role": "user", "content": "Hi"}])


@pytest.mark.django_db(transaction=True)
async def test_socket_turn_is_refused_for_an_unpriced_model_and_books_zero_when_priced_zero(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    await Assistant.objects.filter(pk=setup.assistant.pk).aupdate(model=SELF_HOSTED)
    await adb(_bump)(setup.tenant.pk)
    async with chat(await adb(setup.token)()) as socket:
        refused = await socket.turn("Hello")
        assert refused[-1]["type"] == "error" and refused[-1]["code"] == "invalid_request"
        assert SELF_HOSTED in refused[-1]["message"]
        await adb(_price)(setup.tenant, SELF_HOSTED, "0", "0")
        events = await socket.turn("Hello again")
    assert events[-1]["type"] == "message.completed" and events[-1]["cost_usd"] == "0"
    [record] = await adb(_records)(setup.tenant)
    assert record.model == SELF_HOSTED and record.cost_usd == 0 and record.completion_tokens > 0


def _bump(tenant_id: int) -> None:
    from tenants.freshness import config_changed

    config_changed(tenant_id)  # the queryset update above went behind the signals' back


@pytest.mark.django_db(transaction=True)
def test_rest_turn_is_refused_for_an_unpriced_model_and_uses_the_tenant_price(parley, tenant_factory, sim):
    setup = tenant_factory()
    Assistant.objects.filter(pk=setup.assistant.pk).update(model=SELF_HOSTED)
    _bump(setup.tenant.pk)
    http = httpx2.Client(base_url=parley.url, headers={"Authorization": f"Bearer {setup.api_key}"}, timeout=15)
    conversation = http.post("/api/v1/conversations/", json={}).json()
    refused = http.post(f"/api/v1/conversations/{conversation['id']}/messages/", json={"content": "Hi"})
    assert refused.status_code == 400 and SELF_HOSTED in refused.json()["error"]["message"]
    _price(setup.tenant, SELF_HOSTED, "3", "5")
    reply = http.post(f"/api/v1/conversations/{conversation['id']}/messages/", json={"content": "Hi"})
    assert reply.status_code == 201, reply.text
    [record] = _records(setup.tenant)
    assert record.cost_usd == (record.prompt_tokens * 3 + record.completion_tokens * 5) / Decimal(1_000_000) > 0


# --- REST: /api/v1/prices/ ----------------------------------------------------------------


@pytest.mark.django_db
def test_prices_list_marks_own_rows_and_the_global_ones_it_falls_back_on(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    _price(ours.tenant, MODEL, "1", "2")
    _price(theirs.tenant, "their-llm", "0", "0")
    rows = {row["model"]: row for row in _api(ours.api_key).get("/api/v1/prices/").json()}
    assert rows[MODEL]["source"] == "tenant" and rows[MODEL]["input_per_million"] == "1.0000"
    assert rows["gpt-4o"]["source"] == "global" and rows["gpt-4o"]["output_per_million"] == "15.0000"
    assert "their-llm" not in rows
    assert _api(ours.api_key).get("/api/v1/prices/gpt-4o/").json()["source"] == "global"
    assert _api(ours.api_key).get(f"/api/v1/prices/{MODEL}/").json()["source"] == "tenant"


@pytest.mark.django_db
def test_prices_create_change_delete_are_the_tenants_own_and_audited(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    api = _api(ours.api_key)
    body = {"model": SELF_HOSTED, "input_per_million": "0.5", "output_per_million": "1.5"}
    created = api.post("/api/v1/prices/", body, format="json")
    assert created.status_code == 201
    assert created.json()["cached_input_per_million"] == "0.5000"  # defaults: no discount assumed
    assert created.json()["batch_output_per_million"] == "1.5000" and created.json()["source"] == "tenant"
    taken = api.post("/api/v1/prices/", body, format="json")  # taken: PATCH it
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "conflict"

    changed = api.patch(f"/api/v1/prices/{SELF_HOSTED}/", {"output_per_million": "0"}, format="json")
    assert changed.status_code == 200 and changed.json()["output_per_million"] == "0.0000"
    assert price_for(SELF_HOSTED, tenant_id=ours.tenant.pk).output == 0

    # Another tenant's row, and a global row, are not this key's to read as its own or change.
    assert _api(theirs.api_key).get(f"/api/v1/prices/{SELF_HOSTED}/").status_code == 404
    assert _api(theirs.api_key).patch(f"/api/v1/prices/{SELF_HOSTED}/", {"output_per_million": "9"},
                                      format="json").status_code == 404
    assert _api(theirs.api_key).delete(f"/api/v1/prices/{SELF_HOSTED}/").status_code == 404
    assert api.patch("/api/v1/prices/gpt-4o/", {"input_per_million": "0"}, format="json").status_code == 404
    assert api.delete("/api/v1/prices/gpt-4o/").status_code == 404

    assert api.delete(f"/api/v1/prices/{SELF_HOSTED}/").status_code == 204
    with pytest.raises(PriceMissing):
        price_for(SELF_HOSTED, tenant_id=ours.tenant.pk)
    actions = list(AuditEntry.objects.filter(tenant=ours.tenant, action__startswith="price.")
                   .order_by("created_at").values_list("action", flat=True))
    assert actions == ["price.create", "price.change", "price.delete"]


@pytest.mark.django_db
def test_prices_bodies_are_validated(tenant_factory):
    api = _api(tenant_factory().api_key)
    for body in (
        {"model": "x", "input_per_million": "-1", "output_per_million": "1"},
        {"model": "x", "input_per_million": "1"},
        {"model": "bad name", "input_per_million": "1", "output_per_million": "1"},
        {"model": "x", "input_per_million": "1", "output_per_million": "1", "source": "global"},
        {"model": "x", "input_per_million": "1", "output_per_million": "1", "tenant": 1},
    ):
        response = api.post("/api/v1/prices/", body, format="json")
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request", body
    api.post("/api/v1/prices/", {"model": "x", "input_per_million": "1", "output_per_million": "1"}, format="json")
    assert api.patch("/api/v1/prices/x/", {"model": "y"}, format="json").status_code == 400


# --- the admin ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_admin_owner_prices_models_for_their_tenant_and_reads_the_global_list(tenant_factory):
    from tenants.services import owner_add

    ours, theirs = tenant_factory(), tenant_factory()
    _price(theirs.tenant, "their-llm", "0", "0")
    owner = owner_add(tenant=ours.tenant, email="owner@prices.test", password="pw-123456789")
    client = Client()
    client.force_login(owner.user)
    response = client.post("/admin/billing/tenantmodelprice/add/", {
        "tenant": ours.tenant.pk, "model": SELF_HOSTED, "kind": "chat", "input_per_million": "0",
        "cached_input_per_million": "0", "output_per_million": "0", "batch_input_per_million": "0",
        "batch_output_per_million": "0", "context_window": "8192",
    })
    assert response.status_code == 302, response.content[:2000]
    row = TenantModelPrice.objects.get(model=SELF_HOSTED)
    assert row.tenant_id == ours.tenant.pk and price_for(SELF_HOSTED, tenant_id=ours.tenant.pk).output == 0
    listing = client.get("/admin/billing/tenantmodelprice/").content.decode()
    assert SELF_HOSTED in listing and "their-llm" not in listing
    # The global list shows global rows only, read-only for a tenant owner.
    global_list = client.get("/admin/billing/modelprice/").content.decode()
    assert "gpt-4o" in global_list and SELF_HOSTED not in global_list and "their-llm" not in global_list
    gpt4o = ModelPrice.objects.get(model="gpt-4o", tenant__isnull=True)
    assert client.post(f"/admin/billing/modelprice/{gpt4o.pk}/change/", {"input_per_million": "0"}).status_code == 403


@pytest.mark.django_db(transaction=True)
def test_a_tenant_price_added_between_calls_applies_to_the_next_call(parley, tenant_factory, sim):
    setup = tenant_factory()
    client = _sdk(parley, setup.api_key)
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])  # warm: global price cached
    _api(setup.api_key).post("/api/v1/prices/", {"model": MODEL, "input_per_million": "0", "output_per_million": "0"},
                             format="json")
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    first, second = _records(setup.tenant)
    assert first.cost_usd > 0 and second.cost_usd == 0


@pytest.mark.django_db
def test_admin_assistant_form_accepts_a_model_priced_by_its_tenant_only(tenant_factory):
    from tenants.services import owner_add

    ours, theirs = tenant_factory(), tenant_factory()
    _price(ours.tenant, SELF_HOSTED, "0", "0")
    for setup, expected in ((ours, 302), (theirs, 200)):  # 200: the form again, with the error
        owner = owner_add(tenant=setup.tenant, email=f"owner@{setup.tenant.slug}.test", password="pw-123456789")
        client = Client()
        client.force_login(owner.user)
        response = client.post(f"/admin/conversations/assistant/{setup.assistant.pk}/change/", {
            "slug": "default", "model": SELF_HOSTED, "temperature": "0.7", "max_tokens": "100", "tools": "[]",
            "tool_choice": "auto", "max_tool_rounds": "5", "history_strategy": "summarize",
            "history_window_tokens": "4000", "summary_high_water_tokens": "16000", "summary_low_water_tokens": "1500",
            "summary_model": "gpt-4o-mini", "response_cache": "off", "response_cache_ttl": "86400", "routes": "[]",
            "is_default": "on",
        })
        assert response.status_code == expected, response.content.decode()[:3000]
        assert (Assistant.objects.get(pk=setup.assistant.pk).model == SELF_HOSTED) == (expected == 302)
    assert "no price for this tenant" in response.content.decode()
