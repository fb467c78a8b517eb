"""Provider URLs a tenant may set: the webhooks' egress rules (tenants/egress.py) applied when a
credential is saved (admin form, create_tenant) and on every connection (DNS may change)."""

from __future__ import annotations

import ipaddress
import json
import uuid

import httpcore2
import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse

from llm.probe import providers_probe
from llm.transport import ProviderTarget
from tenants import egress
from tenants.egress import EgressRule, url_address_refusal
from tenants.models import ProviderCredential
from tests.conftest import adb
from tests.v1direct import closing_hop, v1_handle

pytestmark = pytest.mark.django_db(transaction=True)

REFUSED_URLS = {
    "http://127.0.0.1:8000/v1": "loopback",
    "http://10.1.2.3/v1": "private",
    "http://192.168.1.10:8080/v1": "private",
    "http://[::1]:9000/v1": "loopback",
}
METADATA_URLS = ["http://169.254.169.254/latest/meta-data", "http://[fd00:ec2::254]/v1"]


@pytest.mark.parametrize(("url", "kind"), REFUSED_URLS.items())
def test_loopback_and_private_urls_are_refused_unless_allowed(url, kind):
    assert kind in url_address_refusal(url, EgressRule())
    assert url_address_refusal(url, EgressRule(allow_private=True)) is None


@pytest.mark.parametrize("url", METADATA_URLS)
def test_metadata_addresses_are_refused_even_when_private_ones_are_allowed(url):
    everything = EgressRule(allow_private=True, allowed_networks=(ipaddress.ip_network("0.0.0.0/0"),))
    assert "metadata" in url_address_refusal(url, everything)


def test_allowed_networks_open_only_themselves():
    subnet = EgressRule(allowed_networks=(ipaddress.ip_network("10.1.0.0/16"),))
    assert url_address_refusal("http://10.1.2.3/v1", subnet) is None
    assert "private" in url_address_refusal("http://10.2.0.1/v1", subnet)
    assert "loopback" in url_address_refusal("http://127.0.0.1/v1", subnet)


@pytest.mark.parametrize("url", ["ftp://93.184.216.34/v1", "http://user:pw@93.184.216.34/v1", "http:///v1"])
def test_unusable_urls_are_refused(url):
    assert url_address_refusal(url, EgressRule()) is not None


def test_a_public_address_and_an_unresolvable_name_pass_the_save_time_check():
    assert url_address_refusal("https://93.184.216.34/v1", EgressRule()) is None
    # Not refused now (offline, or DNS not ready yet): every connection checks again.
    assert url_address_refusal("https://provider.invalid/v1", EgressRule()) is None


# --- when the credential is saved ----------------------------------------------------------


def _admin_client(tenant_factory) -> tuple[Client, ProviderCredential]:
    email = f"owner-{uuid.uuid4().hex[:8]}@egress.test"
    setup = tenant_factory(owner_email=email, owner_password="pw-egress-123")
    client = Client()
    client.force_login(get_user_model().objects.get(username=email))
    return client, ProviderCredential.objects.get(tenant=setup.tenant)


def _credential_form(url: str) -> dict[str, str]:
    return {"name": f"c-{uuid.uuid4().hex[:6]}", "base_url": url, "organization": "", "new_api_key": "sk-x"}


@pytest.mark.parametrize("url", [*REFUSED_URLS, *METADATA_URLS])
def test_the_admin_form_refuses_a_loopback_private_or_metadata_url(tenant_factory, settings, url):
    settings.PROVIDER_ALLOW_PRIVATE_URLS = False
    client, credential = _admin_client(tenant_factory)
    add = reverse("admin:tenants_providercredential_add")
    refused = client.post(add, _credential_form(url))
    assert refused.status_code == 200
    assert "This URL is refused" in str(refused.context["adminform"].form.errors["base_url"])
    change = reverse("admin:tenants_providercredential_change", args=[credential.pk])
    assert client.post(change, {**_credential_form(url), "new_api_key": ""}).status_code == 200
    credential.refresh_from_db()
    assert credential.base_url != url


def test_the_admin_form_accepts_private_urls_when_the_operator_allows_them(tenant_factory, settings):
    settings.PROVIDER_ALLOW_PRIVATE_URLS = True
    client, _ = _admin_client(tenant_factory)
    add = reverse("admin:tenants_providercredential_add")
    assert client.post(add, _credential_form("http://10.1.2.3/v1")).status_code == 302
    assert client.post(add, _credential_form(METADATA_URLS[0])).status_code == 200  # never

    settings.PROVIDER_ALLOW_PRIVATE_URLS = False
    settings.PROVIDER_ALLOWED_NETWORKS = ["10.1.0.0/16"]
    assert client.post(add, _credential_form("http://10.1.9.9/v1")).status_code == 302
    assert client.post(add, _credential_form("http://10.2.0.1/v1")).status_code == 200


def test_create_tenant_refuses_a_private_provider_url(settings, capsys):
    from billing.defaults import install_default_prices
    from billing.models import ModelPrice

    install_default_prices(ModelPrice)  # transactional tests flush what the migrations made
    settings.PROVIDER_ALLOW_PRIVATE_URLS = False
    with pytest.raises(CommandError, match="loopback"):
        call_command("create_tenant", "egress-refused", "--provider-base-url", "http://127.0.0.1:9100/v1")
    settings.PROVIDER_ALLOW_PRIVATE_URLS = True
    call_command("create_tenant", "egress-allowed", "--provider-base-url", "http://127.0.0.1:9100/v1")
    assert json.loads(capsys.readouterr().out)["tenant"] == "egress-allowed"


# --- when a call connects ------------------------------------------------------------------


async def test_a_turn_to_a_loopback_provider_is_refused_at_connect(tenant_factory, chat, sim, settings):
    setup = await adb(tenant_factory)()  # saved while allowed (the suite's setting)
    settings.PROVIDER_ALLOW_PRIVATE_URLS = False
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("Hello")
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "upstream_error"
    assert "refused" in error["message"] and "loopback" in error["message"]
    assert sim.stats.requests == 0  # refused before any connection, and not retried


async def test_a_v1_call_to_a_loopback_provider_is_refused_at_connect(tenant_factory, sim, settings, monkeypatch):
    from compat import calls, openai_api

    monkeypatch.setattr(openai_api, "db", closing_hop)
    monkeypatch.setattr(calls, "db_after", closing_hop)
    setup = await adb(tenant_factory)()
    settings.PROVIDER_ALLOW_PRIVATE_URLS = False
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    sent = await v1_handle(setup.api_key, body)
    assert sent[0]["status"] == 502
    assert "loopback" in json.loads(sent[-1]["body"])["error"]["message"]
    assert sim.stats.requests == 0


def test_a_name_that_now_resolves_to_a_private_address_is_refused_at_connect(simulator_server, sim, settings, monkeypatch):
    """DNS rebinding: the name was public when saved; at connect it points inside."""
    answers = {"provider.example": ["127.0.0.1"]}

    async def resolve(host: str, port: int):
        return [ipaddress.ip_address(address) for address in answers[host]]

    monkeypatch.setattr(egress, "address_resolve", resolve)
    target = ProviderTarget(
        credential_id=1, base_url=f"http://provider.example:{simulator_server.port}/v1", api_key="sk-x"
    )

    settings.PROVIDER_ALLOW_PRIVATE_URLS = False
    [refused] = providers_probe([target])
    assert not refused.ok and "provider.example resolves to a loopback address" in refused.detail

    # Allowed, the connection goes to the checked address (the simulator), by its name.
    settings.PROVIDER_ALLOW_PRIVATE_URLS = True
    [connected] = providers_probe([target])
    assert connected.ok, connected.detail


def test_the_provider_transport_connects_through_the_guard():
    from llm import clients

    transport = clients.GuardedTransport(limits=clients.DEFAULT_LIMITS)
    assert isinstance(transport._pool, httpcore2.AsyncConnectionPool)
    assert isinstance(transport._pool._network_backend, egress.GuardedBackend)
