"""Routing in the admin: assistant routes and model aliases are validated; transcripts show routes."""

from __future__ import annotations

import json

import pytest

from conversations.models import Assistant, Conversation, Message
from routing.models import ModelAlias
from tests.test_admin import _client, _form_defaults, _url, world  # noqa: F401 — the fixture

pytestmark = pytest.mark.django_db

ROUTES = [{"name": "short", "model": "gpt-4o-mini", "when": {"max_input_tokens": 200, "pattern": "(?i)refund"}}]


def test_the_assistant_form_saves_valid_routes_and_refuses_invalid_ones_saying_why(world):  # noqa: F811
    client, assistant = _client(world.admin), world.a[Assistant]
    url = _url(Assistant, "change", assistant.pk)
    data = _form_defaults(client, url)
    refused = client.post(url, {**data, "routes": json.dumps([{"name": "x", "model": "m", "when": {"pattern": "("}}])})
    assert refused.status_code == 200
    [error] = refused.context["adminform"].form.errors["routes"]
    assert "routes[0].when.pattern: not a valid regular expression" in error
    assert client.post(url, {**data, "routes": json.dumps(ROUTES)}).status_code == 302
    assistant.refresh_from_db()
    assert assistant.routes == ROUTES


def test_an_alias_is_added_for_the_users_tenant_and_checked(world):  # noqa: F811
    client = _client(world.admin)
    url = _url(ModelAlias, "add")
    base = {"name": "auto", "default_model": "gpt-4o", "routes": json.dumps(ROUTES)}
    refused = client.post(url, {**base, "name": "gpt-4o"})
    assert "name" in refused.context["adminform"].form.errors  # a priced model's name
    refused = client.post(url, {**base, "default_model": "no-such-model"})
    assert "default_model" in refused.context["adminform"].form.errors
    refused = client.post(url, {**base, "routes": json.dumps([{"name": "x"}])})
    assert "'model' is a required property" in refused.context["adminform"].form.errors["routes"][0]
    assert client.post(url, {**base, "tenant": world.b.tenant.pk}).status_code == 302
    assert ModelAlias.objects.get(name="auto").tenant == world.a.tenant


def test_the_transcript_shows_each_answers_model_and_route(world):  # noqa: F811
    conversation = world.a[Conversation]
    Message.objects.filter(conversation=conversation, role="assistant").update(route="short-route")
    body = _client(world.member).get(_url(Conversation, "change", conversation.pk)).content.decode()
    assert "short-route" in body and "gpt-4o-mini" in body
