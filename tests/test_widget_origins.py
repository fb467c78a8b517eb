"""Allowed origins per tenant (the chat widget on tenants' own sites), /embed.js and /embed/config."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from rest_framework.test import APIClient

from embed.views import simulated
from tenants.admin import TenantForm
from tenants.models import Tenant
from tenants.origins import InvalidOrigin, origin_normalize, tenant_allowed_origins_set
from tests.conftest import adb
from tests.test_ws_access import _session_cookie, _socket

pytestmark = pytest.mark.django_db(transaction=True)

SHOP = "https://shop.example"


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("https://Shop.Example", "https://shop.example"),
        ("https://shop.example:443/", "https://shop.example"),
        ("http://localhost:8080", "http://localhost:8080"),
        ("HTTP://127.0.0.1:3000", "http://127.0.0.1:3000"),
    ],
)
def test_an_origin_is_stored_as_a_browser_sends_it(given, stored):
    assert origin_normalize(given) == stored


@pytest.mark.parametrize(
    "bad",
    ["shop.example", "ftp://shop.example", "https://shop.example/path", "https://shop.example?q=1",
     "https://user@shop.example", "https://*.example", "https://shop.example:99999", "https://", "http://[::1]:3000"],
)
def test_anything_but_scheme_host_port_is_refused(bad):
    with pytest.raises(InvalidOrigin):
        origin_normalize(bad)


# --- the socket ---------------------------------------------------------------------------


async def _connects(path: str, origin: bytes, cookie: bytes | None = None) -> bool:
    headers = [(b"origin", origin), (b"host", b"127.0.0.1")] + ([(b"cookie", cookie)] if cookie else [])
    async with _socket(path, headers) as (connected, _):
        return connected


async def test_a_token_socket_from_an_allowed_origin_of_its_tenant_is_accepted(tenant_factory):
    setup = await adb(tenant_factory)()
    await adb(tenant_allowed_origins_set)(tenant=setup.tenant, origins=[SHOP, "http://localhost:3000"])
    token = await adb(setup.token)()
    assert await _connects(f"/ws/chat/?token={token}", b"https://shop.example")
    assert await _connects(f"/ws/chat/?token={token}", b"http://localhost:3000")
    assert not await _connects(f"/ws/chat/?token={token}", b"http://shop.example")  # another scheme
    assert not await _connects(f"/ws/chat/?token={token}", b"https://shop.example:8443")  # another port
    assert not await _connects(f"/ws/chat/?token={token}", b"https://evil.example")


async def test_another_tenants_origin_does_not_open_a_socket(tenant_factory):
    listed, other = await adb(tenant_factory)(), await adb(tenant_factory)()
    await adb(tenant_allowed_origins_set)(tenant=listed.tenant, origins=[SHOP])
    token = await adb(other.token)()
    assert not await _connects(f"/ws/chat/?token={token}", SHOP.encode())


async def test_a_forged_token_gets_no_tenant_origins(tenant_factory):
    setup = await adb(tenant_factory)()
    await adb(tenant_allowed_origins_set)(tenant=setup.tenant, origins=[SHOP])
    token = await adb(setup.token)()
    assert not await _connects(f"/ws/chat/?token={token[:-2]}xx", SHOP.encode())


async def test_a_cookie_socket_is_refused_from_the_tenants_origins_too(tenant_factory):
    setup = await adb(tenant_factory)()
    await adb(tenant_allowed_origins_set)(tenant=setup.tenant, origins=[SHOP])
    cookie = await adb(_session_cookie)(setup.tenant)
    assert not await _connects("/ws/chat/", SHOP.encode(), cookie)
    assert await _connects("/ws/chat/", b"http://127.0.0.1:8000", cookie)


# --- where a tenant sets them -------------------------------------------------------------


def test_create_tenant_takes_allowed_origins(tenant_factory, simulator_server):
    tenant_factory()  # the prices a tenant needs
    out = StringIO()
    call_command(
        "create_tenant", "shop", "--provider-base-url", simulator_server.base_url,
        "--allowed-origins", "https://Shop.Example, http://localhost:3000", stdout=out,
    )
    assert json.loads(out.getvalue())["tenant"] == "shop"
    assert Tenant.objects.get(slug="shop").allowed_origins == [SHOP, "http://localhost:3000"]
    with pytest.raises(CommandError, match="allowed-origins"):
        call_command("create_tenant", "shop2", "--allowed-origins", "https://shop.example/path", stdout=StringIO())
    assert not Tenant.objects.filter(slug="shop2").exists()


def test_the_rest_api_reads_and_replaces_the_callers_allowed_origins(tenant_factory):
    setup, other = tenant_factory(), tenant_factory()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {setup.api_key}")
    assert api.get("/api/v1/tenant/").json() == {"slug": setup.tenant.slug, "name": setup.tenant.name, "allowed_origins": []}
    response = api.patch("/api/v1/tenant/", {"allowed_origins": ["https://Shop.Example:443"]}, format="json")
    assert response.status_code == 200 and response.json()["allowed_origins"] == [SHOP]
    bad = api.patch("/api/v1/tenant/", {"allowed_origins": ["javascript:alert(1)"]}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"
    assert api.patch("/api/v1/tenant/", {"allowed_origins": [], "slug": "x"}, format="json").status_code == 400
    too_many = api.patch("/api/v1/tenant/", {"allowed_origins": [SHOP] * 51}, format="json")  # the schema's maxItems
    assert too_many.status_code == 400 and "allowed_origins" in too_many.json()["error"]["fields"]
    setup.tenant.refresh_from_db()
    other.tenant.refresh_from_db()
    assert setup.tenant.allowed_origins == [SHOP] and other.tenant.allowed_origins == []


def test_the_admin_form_takes_one_origin_a_line_and_refuses_a_path(tenant_factory):
    setup = tenant_factory()
    data = {"slug": setup.tenant.slug, "name": "N", "is_active": True, "end_user_rpm": 20, "tenant_rpm": 600, "tenant_tpm": 1000}
    form = TenantForm(data={**data, "allowed_origins": "https://Shop.Example\nhttp://localhost:3000\n"}, instance=setup.tenant)
    assert form.is_valid(), form.errors
    assert form.cleaned_data["allowed_origins"] == [SHOP, "http://localhost:3000"]
    form = TenantForm(data={**data, "allowed_origins": "https://shop.example/checkout"}, instance=setup.tenant)
    assert not form.is_valid() and "allowed_origins" in form.errors


# --- /embed.js and /embed/config --------------------------------------------------------


def test_embed_js_is_served_to_any_origin_with_a_cache_header(client):
    response = client.get("/embed.js", HTTP_ORIGIN="https://shop.example")
    body = response.content.decode()
    assert response.status_code == 200 and response["Content-Type"].startswith("text/javascript")
    assert response["Access-Control-Allow-Origin"] == "*"
    assert "max-age=" in response["Cache-Control"] and response["ETag"]
    assert 'customElements.define("parley-chat"' in body and "DOMPurify" in body and "markdown-it" in body.lower()
    assert client.get("/embed.js", HTTP_IF_NONE_MATCH=response["ETag"]).status_code == 304


def test_embed_config_says_whether_the_page_may_open_the_socket(tenant_factory):
    setup = tenant_factory()
    tenant_allowed_origins_set(tenant=setup.tenant, origins=[SHOP])
    token = setup.token()
    client = Client()
    allowed = client.get(f"/embed/config?token={token}", HTTP_ORIGIN=SHOP)
    assert allowed.json() == {"origin_allowed": True, "simulator": False}
    assert allowed["Access-Control-Allow-Origin"] == "*"
    assert client.get(f"/embed/config?token={token}", HTTP_ORIGIN="https://evil.example").json()["origin_allowed"] is False
    assert client.get("/embed/config?token=forged").status_code == 401


def test_the_built_in_simulator_is_recognised_by_its_mount_path(tenant_factory):
    assert simulated("http://127.0.0.1:8000/simulator/v1") and simulated("https://parley.example/simulator/v1/")
    assert not simulated("https://api.openai.com/v1")
    setup = tenant_factory()
    credential = setup.tenant.credentials.get()
    credential.base_url = "http://127.0.0.1:8000/simulator/v1"
    credential.save()
    assert Client().get(f"/embed/config?token={setup.token()}").json()["simulator"] is True
