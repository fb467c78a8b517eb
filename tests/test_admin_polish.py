"""The admin says Parley, names its models properly, shows a transcript that fits a 1366 px
screen with tool calls as escaped, pretty-printed JSON, and every page has Parley's favicon."""

from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ElementTree

import pytest
from django.contrib import admin
from django.contrib.staticfiles import finders
from django.templatetags.static import static
from django.test import Client

from conversations.models import Conversation, Message
from tenants.services import owner_add

pytestmark = pytest.mark.django_db

TOOL_CALLS = [{
    "id": "call_1", "type": "function",
    "function": {"name": "lookup", "arguments": '{"q": "<script>alert(1)</script>"}'},
}]


@pytest.fixture
def owner(tenant_factory, settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    setup = tenant_factory()
    membership = owner_add(tenant=setup.tenant, email="owner@polish.test", password="pw-123456789")
    client = Client()
    client.force_login(membership.user)
    client.setup = setup
    return client


def _conversation(setup) -> Conversation:
    conversation = Conversation.objects.create(
        tenant=setup.tenant, assistant=setup.assistant, end_user=setup.end_user(), last_seq=2
    )
    Message.objects.create(tenant=setup.tenant, conversation=conversation, seq=1, role="user", content="x" * 3000)
    Message.objects.create(
        tenant=setup.tenant, conversation=conversation, seq=2, role="assistant", content="", tool_calls=TOOL_CALLS,
    )
    return conversation


def test_the_admin_says_parley(owner):
    index = owner.get("/admin/").content.decode()
    assert "<title>Administration | Parley admin</title>" in index
    assert '<a href="/admin/">Parley</a>' in index
    assert "Django administration" not in index and "Django site admin" not in index
    assert (admin.site.site_header, admin.site.site_title) == ("Parley", "Parley admin")


def test_plural_names_are_english(owner):
    index = owner.get("/admin/").content.decode()
    assert "Audit entries" in index and "API keys" in index
    assert "entrys" not in index and "Api keys" not in index
    for model in admin.site._registry:
        plural = str(model._meta.verbose_name_plural)
        assert not plural.endswith(("ys", "ss")) or plural.endswith("keys"), plural


def test_transcript_fits_the_screen_and_shows_tool_calls_as_escaped_json(owner):
    conversation = _conversation(owner.setup)
    body = owner.get(f"/admin/conversations/conversation/{conversation.pk}/change/").content.decode()
    # No width the screen must make room for: a fixed layout that wraps long content.
    assert "table-layout: fixed" in body and "overflow-wrap: anywhere" in body
    assert 'style="width: 100%"' not in body and "max-width: 60em" not in body
    transcript = body[body.index('<div class="module transcript">'):body.index('<div class="module usage-records">')]
    assert transcript.count("<th>") == 8 and "<colgroup>" in transcript
    pre = re.search(r'<pre class="tool-calls">(.*?)</pre>', transcript, re.S)
    assert pre is not None
    assert json.loads(html.unescape(pre.group(1))) == TOOL_CALLS
    assert '\n  {\n    "id": "call_1",' in html.unescape(pre.group(1))  # indented, not one line
    assert "<script>alert(1)</script>" not in body and "&lt;script&gt;" in pre.group(1)
    assert "{'id'" not in html.unescape(body)  # not a Python repr


def test_the_favicon_is_linked_from_the_admin_and_the_chat_page(owner):
    link = f'<link rel="icon" href="{static("favicon.svg")}" type="image/svg+xml">'
    assert link in owner.get("/admin/").content.decode()
    assert link in Client().get("/admin/login/").content.decode()
    assert link in owner.get("/").content.decode()


def test_favicon_ico_points_at_the_svg_which_is_a_real_image(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"] == static("favicon.svg")
    path = finders.find("favicon.svg")
    assert path is not None
    root = ElementTree.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg" and root.get("viewBox") == "0 0 32 32"
