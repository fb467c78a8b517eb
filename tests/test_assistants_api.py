"""/api/v1/assistants/: tenant-scoped CRUD with validation (priced models, existing tools,
well-formed routes), one default per tenant, 409 for an assistant in use, audited writes."""

from __future__ import annotations

import httpx2
import pytest
from rest_framework.test import APIClient

from billing.models import ModelPrice
from conversations.models import Assistant, Conversation
from tenants.models import AuditEntry
from tools.models import WebhookTool

pytestmark = pytest.mark.django_db

ROUTES = [
    {"name": "short", "model": "gpt-4o-mini", "when": {"max_input_tokens": 200, "tools": False}},
    {"name": "code", "model": "gpt-4o", "when": {"pattern": r"(?i)\bstack trace\b", "min_depth": 0, "max_depth": 10}},
    {"name": "graded", "model": "gpt-4o", "when": {"classifier": {"model": "gpt-4o-mini", "label": "complex"}}},
]


def _api(api_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    return client


def _errors(response) -> dict:
    assert response.status_code == 400, response.json()
    assert response.json()["error"]["code"] == "invalid_request"
    return response.json()["error"]["fields"]


def test_create_read_list_update_delete(tenant_factory):
    setup = tenant_factory()
    api = _api(setup.api_key)
    body = {
        "slug": "support", "name": "Support", "model": "gpt-4o", "system_prompt": "Be brief.", "temperature": 0.2,
        "max_tokens": 300, "tools": ["calculator"], "tool_choice": "calculator", "history_strategy": "window",
        "history_window_tokens": 2000, "response_cache": "exact", "response_cache_ttl": 3600, "routes": ROUTES,
    }
    created = api.post("/api/v1/assistants/", body, format="json")
    assert created.status_code == 201, created.json()
    shown = created.json()
    assert {k: shown[k] for k in body} == body and shown["is_default"] is False
    stored = Assistant.objects.get(tenant=setup.tenant, slug="support")
    assert stored.routes == ROUTES and stored.response_cache == "exact" and stored.tools == ["calculator"]

    assert api.get("/api/v1/assistants/support/").json() == shown
    assert [a["slug"] for a in api.get("/api/v1/assistants/").json()] == ["default", "support"]

    patched = api.patch("/api/v1/assistants/support/", {"model": "gpt-4o-mini", "routes": []}, format="json")
    assert patched.status_code == 200 and patched.json()["model"] == "gpt-4o-mini" and patched.json()["routes"] == []
    assert patched.json()["system_prompt"] == "Be brief."  # a PATCH changes what it names only

    assert api.delete("/api/v1/assistants/support/").status_code == 204
    assert not Assistant.objects.filter(tenant=setup.tenant, slug="support").exists()
    assert api.get("/api/v1/assistants/support/").status_code == 404
    actions = list(AuditEntry.objects.filter(tenant=setup.tenant, action__startswith="assistant.")
                   .order_by("created_at").values_list("action", "changes"))
    assert [a for a, _ in actions] == ["assistant.create", "assistant.change", "assistant.delete"]
    assert actions[1][1] == ["model", "routes"]


def test_another_tenants_assistant_answers_like_a_missing_one(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    Assistant.objects.create(tenant=theirs.tenant, slug="secret", model="gpt-4o")
    api = _api(ours.api_key)
    missing = api.get("/api/v1/assistants/nope/")
    for response in (api.get("/api/v1/assistants/secret/"),
                     api.patch("/api/v1/assistants/secret/", {"name": "x"}, format="json"),
                     api.delete("/api/v1/assistants/secret/")):
        assert response.status_code == 404 and response.json() == missing.json()
    assert "secret" not in [a["slug"] for a in api.get("/api/v1/assistants/").json()]
    assert Assistant.objects.get(slug="secret").name == ""


def test_model_must_be_priced_for_the_tenant(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    ModelPrice.objects.create(tenant=ours.tenant, model="my-llm", input_per_million=0, cached_input_per_million=0,
                              output_per_million=0, batch_input_per_million=0, batch_output_per_million=0)
    assert "model" in _errors(_api(ours.api_key).post("/api/v1/assistants/", {"slug": "a", "model": "gpt-9"}, format="json"))
    assert "summary_model" in _errors(_api(ours.api_key).post(
        "/api/v1/assistants/", {"slug": "a", "summary_model": "gpt-9"}, format="json"))
    assert _api(ours.api_key).post("/api/v1/assistants/", {"slug": "a", "model": "my-llm"}, format="json").status_code == 201
    # Priced by another tenant is unpriced here.
    assert "model" in _errors(_api(theirs.api_key).post("/api/v1/assistants/", {"slug": "a", "model": "my-llm"}, format="json"))


def test_tools_must_exist_for_the_tenant(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    WebhookTool.objects.create(tenant=theirs.tenant, name="lookup", url="https://example.com/hook")
    api = _api(ours.api_key)
    assert "tools" in _errors(api.post("/api/v1/assistants/", {"slug": "a", "tools": ["lookup"]}, format="json"))
    assert "tool_choice" in _errors(api.post("/api/v1/assistants/", {"slug": "a", "tool_choice": "lookup"}, format="json"))
    WebhookTool.objects.create(tenant=ours.tenant, name="lookup", url="https://example.com/hook")
    created = api.post("/api/v1/assistants/", {"slug": "a", "tools": ["lookup", "current_time"], "tool_choice": "required"},
                       format="json")
    assert created.status_code == 201 and created.json()["tools"] == ["lookup", "current_time"]


@pytest.mark.parametrize("routes", [
    [{"name": "r", "model": "gpt-4o", "when": {"max_input_tokens": 10, "colour": "red"}}],  # unknown key
    [{"name": "r", "model": "gpt-4o", "when": {"pattern": "(unclosed"}}],
    [{"name": "r", "model": "gpt-9", "when": {}}],  # unpriced
    [{"name": "r", "model": "gpt-4o", "when": {"max_input_tokens": "10"}}],
    [{"name": "r", "model": "gpt-4o", "when": {"max_depth": True}}],
    [{"name": "r", "model": "gpt-4o", "when": {"min_depth": -1}}],
    [{"name": "r", "model": "gpt-4o", "when": {"tools": "yes"}}],
    [{"name": "r", "model": "gpt-4o", "when": {"classifier": {"model": "gpt-4o-mini"}}}],
    [{"name": "r", "model": "gpt-4o", "when": {"classifier": {"model": "gpt-9", "label": "x"}}}],
    [{"name": "", "model": "gpt-4o", "when": {}}],
    [{"name": "r", "model": "gpt-4o", "when": {"min_depth": 3, "max_depth": 1}}],  # bounds out of order
    [{"name": "r", "model": "gpt-4o", "when": {}, "extra": 1}],
    ["short"],
    {"name": "r"},
])
def test_malformed_routes_are_refused(tenant_factory, routes):
    api = _api(tenant_factory().api_key)
    assert "routes" in _errors(api.post("/api/v1/assistants/", {"slug": "a", "routes": routes}, format="json"))


def test_bodies_are_strict(tenant_factory):
    api = _api(tenant_factory().api_key)
    assert "colour" in _errors(api.post("/api/v1/assistants/", {"slug": "a", "colour": "red"}, format="json"))
    assert "slug" in _errors(api.post("/api/v1/assistants/", {"slug": "not a slug"}, format="json"))
    assert "temperature" in _errors(api.post("/api/v1/assistants/", {"slug": "a", "temperature": 5}, format="json"))
    assert "response_cache" in _errors(api.post("/api/v1/assistants/", {"slug": "a", "response_cache": "always"},
                                                format="json"))
    taken = api.post("/api/v1/assistants/", {"slug": "default"}, format="json")
    assert taken.status_code == 409 and taken.json()["error"]["code"] == "conflict"
    assert "already exists" in taken.json()["error"]["message"]
    api.post("/api/v1/assistants/", {"slug": "second"}, format="json")
    renamed = api.patch("/api/v1/assistants/second/", {"slug": "default"}, format="json")
    assert renamed.status_code == 409 and renamed.json()["error"]["code"] == "conflict"


def test_one_default_per_tenant(tenant_factory):
    setup = tenant_factory()
    api = _api(setup.api_key)
    assert api.post("/api/v1/assistants/", {"slug": "new", "is_default": True}, format="json").status_code == 201
    assert list(Assistant.objects.filter(tenant=setup.tenant, is_default=True).values_list("slug", flat=True)) == ["new"]
    assert api.patch("/api/v1/assistants/default/", {"is_default": True}, format="json").status_code == 200
    assert list(Assistant.objects.filter(tenant=setup.tenant, is_default=True).values_list("slug", flat=True)) == ["default"]


def test_an_assistant_with_conversations_is_not_deleted(tenant_factory):
    setup = tenant_factory()
    Conversation.objects.create(tenant=setup.tenant, assistant=setup.assistant, end_user=setup.end_user())
    response = _api(setup.api_key).delete(f"/api/v1/assistants/{setup.assistant.slug}/")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict" and "conversations" in response.json()["error"]["message"]
    assert Assistant.objects.filter(pk=setup.assistant.pk).exists()
    assert not AuditEntry.objects.filter(action="assistant.delete").exists()


@pytest.mark.django_db(transaction=True)
def test_an_assistant_made_over_rest_answers_with_its_settings(parley, tenant_factory, sim):
    setup = tenant_factory()
    http = httpx2.Client(base_url=parley.url, headers={"Authorization": f"Bearer {setup.api_key}"}, timeout=15)
    created = http.post("/api/v1/assistants/", json={"slug": "terse", "model": "gpt-4o", "max_tokens": 77,
                                                     "system_prompt": "You are terse."})
    assert created.status_code == 201
    conversation = http.post("/api/v1/conversations/", json={"assistant": "terse"}).json()
    reply = http.post(f"/api/v1/conversations/{conversation['id']}/messages/", json={"content": "Hi"})
    assert reply.status_code == 201 and reply.json()["model"] == "gpt-4o"
    sent = sim.requests[-1]
    assert sent["model"] == "gpt-4o" and sent["max_tokens"] == 77
    assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
    # An edit applies to the very next turn.
    assert http.patch("/api/v1/assistants/terse/", json={"max_tokens": 55}).status_code == 200
    http.post(f"/api/v1/conversations/{conversation['id']}/messages/", json={"content": "Again"})
    assert sim.requests[-1]["max_tokens"] == 55
