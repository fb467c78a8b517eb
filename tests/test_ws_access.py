"""Who may hold a socket, and for how long: origins, blocked end users, token expiry."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from rest_framework.test import APIClient

from config.asgi import application
from conversations.models import Conversation
from tenants.models import EndUser
from tenants.services import owner_add
from tests.conftest import ChatSocket, adb

pytestmark = pytest.mark.django_db(transaction=True)

UNAUTHORIZED_CLOSE = {"type": "websocket.close", "code": 4401}


@asynccontextmanager
async def _socket(path: str, headers: list[tuple[bytes, bytes]]):
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect()
    try:
        yield connected, ChatSocket(communicator)
    finally:
        await communicator.disconnect()


def _session_cookie(tenant) -> bytes:
    membership = owner_add(tenant=tenant, email=f"owner@{tenant.slug}.test", password="pw-123456789")
    client = Client()
    client.force_login(membership.user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def _unauthorized_then_closed(socket: ChatSocket, timeout: float = 1.0) -> dict:
    error = await socket.receive(timeout=timeout)
    closed = await socket.communicator.receive_output(timeout=timeout)
    assert closed == UNAUTHORIZED_CLOSE
    return error


# --- origins ------------------------------------------------------------------------------


async def test_a_token_socket_without_an_origin_is_accepted(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)()
    async with _socket(f"/ws/chat/?token={token}", [(b"host", b"127.0.0.1")]) as (connected, socket):
        assert connected
        assert (await socket.turn("hello from a script"))[-1]["type"] == "message.completed"


async def test_a_token_socket_from_a_foreign_origin_is_refused(tenant_factory):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)()
    headers = [(b"origin", b"https://evil.example"), (b"host", b"127.0.0.1")]
    async with _socket(f"/ws/chat/?token={token}", headers) as (connected, _):
        assert not connected


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [(b"http://127.0.0.1:8000", True), (b"https://evil.example", False), (None, False)],
)
async def test_a_cookie_socket_must_come_from_the_operators_hosts(tenant_factory, origin, accepted):
    setup = await adb(tenant_factory)()
    cookie = await adb(_session_cookie)(setup.tenant)
    headers = [(b"host", b"127.0.0.1"), (b"cookie", cookie)] + ([(b"origin", origin)] if origin else [])
    async with _socket("/ws/chat/", headers) as (connected, socket):
        assert connected is accepted
        if accepted:  # and it is signed in: no unauthorized frame
            assert await socket.nothing_more()


# --- blocked end users --------------------------------------------------------------------


def _admin_blocks(tenant, end_user: EndUser) -> None:
    membership = owner_add(tenant=tenant, email=f"admin@{tenant.slug}.test", password="pw-123456789")
    client = Client()
    client.force_login(membership.user)
    response = client.post(
        "/admin/tenants/enduser/", {"action": "block", "_selected_action": [str(end_user.pk)]}
    )
    assert response.status_code == 302


def _admin_saves_blocked(tenant, end_user: EndUser) -> None:
    membership = owner_add(tenant=tenant, email=f"admin@{tenant.slug}.test", password="pw-123456789")
    client = Client()
    client.force_login(membership.user)
    response = client.post(
        f"/admin/tenants/enduser/{end_user.pk}/change/",
        {"tenant": tenant.pk, "external_id": end_user.external_id, "is_blocked": "on"},
    )
    assert response.status_code == 302, response.content[:2000]


@pytest.mark.parametrize("block", [_admin_blocks, _admin_saves_blocked])
async def test_blocking_closes_the_open_socket_and_every_surface_refuses(tenant_factory, chat, sim, block):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)("troll")
    end_user = await adb(setup.end_user)("troll")
    async with chat(token) as socket:
        conversation_id = (await socket.turn("hi"))[0]["id"]
        await adb(block)(setup.tenant, end_user)
        # Timed from the block's end, not its start: the admin request itself (a login, a
        # form) is not what this measures, and on a loaded machine it alone can take seconds.
        blocked = time.monotonic()
        error = await _unauthorized_then_closed(socket)
        assert time.monotonic() - blocked < 1.5
    assert error["type"] == "error" and error["code"] == "unauthorized"

    async with chat(token) as again:  # a new socket with the same token
        assert (await _unauthorized_then_closed(again))["code"] == "unauthorized"

    def rest_refusals():
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {setup.api_key}")
        return [
            api.post(f"/api/v1/conversations/{conversation_id}/messages/", {"content": "hi"}, format="json"),
            api.post("/api/v1/end-users/troll/token/", {}, format="json"),
            api.post("/api/v1/conversations/", {"end_user": "troll"}, format="json"),
        ]

    # Not on the ORM's thread: the message view runs the engine through async_to_sync.
    for response in await sync_to_async(rest_refusals, thread_sensitive=False)():
        assert response.status_code == 403 and response.json()["error"]["code"] == "unauthorized"
    assert await adb(Conversation.objects.filter(end_user=end_user).count)() == 1


async def test_a_block_behind_the_services_back_is_refused_on_the_next_frame(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)("troll")
    async with chat(token) as socket:
        conversation_id = (await socket.turn("hi"))[0]["id"]
        # A raw update tells no socket; the next turn still finds out.
        await adb(EndUser.objects.filter(external_id="troll").update)(is_blocked=True)
        await socket.send({
            "type": "message.create", "conversation_id": conversation_id, "content": "again", "client_msg_id": "c-1"
        })
        error = await _unauthorized_then_closed(socket)
    assert error["code"] == "unauthorized" and error["client_msg_id"] == "c-1"
    assert len(sim.requests) == 1


# --- token expiry -------------------------------------------------------------------------


async def test_a_socket_is_closed_when_its_token_expires(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)("user-1", 2)  # expires in 1–2 s (whole seconds)
    async with chat(token) as socket:
        assert (await socket.turn("hi"))[-1]["type"] == "message.completed"
        error = await _unauthorized_then_closed(socket, timeout=3)
    assert error["code"] == "unauthorized" and "expired" in error["message"]
    assert len(sim.requests) == 1


async def test_an_expired_token_runs_no_more_turns(tenant_factory, chat, sim, monkeypatch):
    from conversations.ws import consumers

    setup = await adb(tenant_factory)()
    token = await adb(setup.token)("user-1", 2)
    # Without the close at expiry (a timer that did not fire), each frame is still checked.
    monkeypatch.setattr(consumers.ChatConsumer, "_expire_later", lambda self: None)
    async with chat(token) as socket:
        await asyncio.sleep(2.1)
        await socket.send({"type": "message.create", "content": "late", "client_msg_id": "c-2"})
        error = await _unauthorized_then_closed(socket)
    assert error["code"] == "unauthorized" and error["client_msg_id"] == "c-2"
    assert len(sim.requests) == 0


@pytest.mark.parametrize("origin", [b"http://evil.example:99999", b"http://[::1", b"null"])
async def test_an_unreadable_origin_is_refused_not_an_error(tenant_factory, origin):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)()
    async with _socket(f"/ws/chat/?token={token}", [(b"origin", origin), (b"host", b"127.0.0.1")]) as (connected, _):
        assert not connected
