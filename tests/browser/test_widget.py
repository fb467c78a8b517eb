"""<parley-chat> on a tenant's own website: another origin, an end-user token."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tenants.origins import tenant_allowed_origins_set
from tests.browser.conftest import SLOW

pytestmark = pytest.mark.django_db(transaction=True)

HOST_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Shop</title><link rel="icon" href="data:,">
<style>* {{ color: red !important; font-size: 40px !important; }} button {{ display: none !important; }}</style>
<script src="{server}/embed.js" defer></script></head>
<body><h1>The shop</h1>
<parley-chat server="{server}" token="{token}" assistant="{assistant}" style="height: 600px"></parley-chat>
<script>
  window.tokenRequests = 0;
  document.addEventListener("token-expired", (event) => {{
    window.tokenRequests += 1;
    event.target.setAttribute("token", "{fresh}");
  }});
</script></body></html>"""


def _host_page(host_site, parley, setup, name: str, *, token: str, fresh: str = "") -> str:
    host_site.pages[f"/{name}"] = HOST_PAGE.format(server=parley.url, token=token, fresh=fresh or token, assistant=setup.assistant.slug)
    return f"{host_site.origin}/{name}"


def test_the_widget_on_an_allowed_site_streams_and_shows_the_earlier_conversation_after_a_reload(
    page, parley, tenant_factory, host_site, console_errors
):
    setup = tenant_factory()
    tenant_allowed_origins_set(tenant=setup.tenant, origins=[host_site.origin])
    page.goto(_host_page(host_site, parley, setup, "allowed", token=setup.token("shopper")))
    chat = page.locator("parley-chat")
    expect(chat.locator(".connection")).to_have_text("Connected")
    chat.get_by_role("textbox", name="Message").fill(f"where is my order {SLOW}")
    chat.get_by_role("button", name="Send").click()  # the host page's CSS hides buttons: not in the shadow DOM
    answer = chat.locator(".msg.assistant .text").last
    expect(answer).to_contain_text("You said: where is my order")
    expect(chat.locator(".msg.assistant.streaming")).to_have_count(1)  # still streaming: it arrives in pieces
    expect(chat.locator(".msg.assistant .meta")).to_have_count(1)
    text = answer.text_content()

    page.reload()
    chat = page.locator("parley-chat")
    expect(chat.locator(".msg.user")).to_have_text([f"where is my order {SLOW}"])
    expect(chat.locator(".msg.assistant .text")).to_have_text([text])
    expect(chat.locator(".list li")).to_have_count(1)
    assert console_errors == []
    parley.settle()


def test_on_a_site_not_listed_the_socket_is_refused_and_the_widget_says_so(page, parley, tenant_factory, host_site):
    listed, other = tenant_factory(), tenant_factory()
    tenant_allowed_origins_set(tenant=listed.tenant, origins=[host_site.origin])  # not `other`'s
    refused = []
    page.on("websocket", lambda socket: socket.on("close", lambda _: refused.append(socket.url)))
    page.goto(_host_page(host_site, parley, other, "not-listed", token=other.token("shopper")))
    chat = page.locator("parley-chat")
    expect(chat.get_by_role("alert")).to_contain_text("is not allowed to open this chat")
    expect(chat.locator(".connection")).to_have_text("Refused by the server")
    assert refused  # the socket was tried, and closed without opening


def test_an_expired_token_asks_the_host_page_for_a_fresh_one(page, parley, tenant_factory, host_site):
    setup = tenant_factory()
    tenant_allowed_origins_set(tenant=setup.tenant, origins=[host_site.origin])
    url = _host_page(host_site, parley, setup, "expiring", token=setup.token("shopper", ttl=2), fresh=setup.token("shopper"))
    page.goto(url)
    chat = page.locator("parley-chat")
    expect(chat.locator(".connection")).to_have_text("Connected")
    page.wait_for_function("window.tokenRequests === 1")
    expect(chat.locator(".connection")).to_have_text("Connected")
    chat.get_by_role("textbox", name="Message").fill("still here [[sim:words=3]]")
    chat.get_by_role("button", name="Send").click()
    expect(chat.locator(".msg.assistant .meta")).to_have_count(1)
    parley.settle()
