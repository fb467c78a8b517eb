"""The built-in chat page at / for signed-in tenant members."""

from __future__ import annotations

import pytest
from django.contrib.staticfiles import finders

from conversations.models import Assistant
from tenants.models import Membership, Tenant

pytestmark = pytest.mark.django_db


def _tenant_with_assistant(slug: str, *, assistant_name: str) -> Tenant:
    tenant = Tenant.objects.create(slug=slug, name=f"{slug.title()} Inc")
    Assistant.objects.create(tenant=tenant, slug="default", name=assistant_name, model="gpt-4o-mini", is_default=True)
    return tenant


def test_anonymous_visitor_is_sent_to_the_login_page(client):
    response = client.get("/")

    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/"


def test_member_sees_their_tenants_assistants_and_no_one_elses(client, django_user_model):
    acme = _tenant_with_assistant("acme", assistant_name="Acme Support")
    Assistant.objects.create(tenant=acme, slug="sales", name="Acme Sales", model="gpt-4o")
    _tenant_with_assistant("globex", assistant_name="Globex Helpdesk")
    user = django_user_model.objects.create_user(username="ann@acme.test", password="pw")
    Membership.objects.create(tenant=acme, user=user, role="owner")
    client.force_login(user)

    response = client.get("/")

    assert response.status_code == 200
    assert response.templates[0].name == "conversations/chat.html"
    page = response.content.decode()
    assert "Acme Inc" in page
    assert 'value="default"' in page and "Acme Support" in page
    assert 'value="sales"' in page and "Acme Sales" in page
    # The default assistant is listed (and so selected) first.
    assert page.index("Acme Support") < page.index("Acme Sales")
    assert "Globex" not in page
    assert 'action="/admin/logout/"' in page and "csrfmiddlewaretoken" in page


def test_member_of_two_tenants_can_switch_between_them(client, django_user_model):
    acme = _tenant_with_assistant("acme", assistant_name="Acme Support")
    globex = _tenant_with_assistant("globex", assistant_name="Globex Helpdesk")
    user = django_user_model.objects.create_user(username="bob@both.test", password="pw")
    Membership.objects.create(tenant=acme, user=user, role="owner")
    Membership.objects.create(tenant=globex, user=user, role="member")
    client.force_login(user)

    page = client.get("/?tenant=globex").content.decode()

    assert 'href="/?tenant=acme"' in page
    assert 'data-tenant="globex"' in page
    assert "Globex Helpdesk" in page and "Acme Support" not in page


def test_user_without_membership_gets_the_no_tenant_page(client, django_user_model):
    _tenant_with_assistant("acme", assistant_name="Acme Support")
    user = django_user_model.objects.create_user(username="eve@nowhere.test", password="pw")
    client.force_login(user)

    response = client.get("/")

    assert response.status_code == 403
    assert response.templates[0].name == "conversations/no_tenant.html"
    page = response.content.decode()
    assert "not a member of any tenant" in page
    assert 'href="/admin/"' in page
    assert "Acme Support" not in page


def test_page_loads_its_script_and_the_script_is_a_static_file(client, django_user_model):
    acme = _tenant_with_assistant("acme", assistant_name="Acme Support")
    user = django_user_model.objects.create_user(username="ann@acme.test", password="pw")
    Membership.objects.create(tenant=acme, user=user, role="member")
    client.force_login(user)

    page = client.get("/").content.decode()

    assert "conversations/chat.js" in page
    assert finders.find("conversations/chat.js")
    assert finders.find("conversations/chat.css")
