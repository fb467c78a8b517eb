"""A socket turn's admission: warm, it reads no configuration from the database before the
upstream call; a change to that configuration applies to the very next turn.

The configuration is cached per web process (`conversations.admission`) and kept fresh only by
the tenant's version, read in the same Redis trip as the rate limits: a change reaches the
socket's process through that version alone, exactly as a change made in another process does.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.db.backends.utils import CursorWrapper
from rest_framework.test import APIClient

from billing.models import ModelPrice, SpendingCap
from conversations import generation
from conversations.models import Conversation
from moderation.services import policy_save
from tenants.models import ApiKey, EndUser
from tenants.services import api_keys_revoke
from tests.conftest import adb

pytestmark = pytest.mark.django_db(transaction=True)

UPSTREAM = "-- the upstream call --"
# What a turn may touch before its upstream call: its own conversation and messages (the
# prompt, the claim) and the money it holds. Everything else is configuration.
TURN_OWN = re.compile(r'"?(conversations_conversation|conversations_message|billing_capperiod|billing_reservation)"?')


@pytest.fixture
def statements(monkeypatch):
    """Every SQL statement of every thread (sockets run the ORM on their own threads), in
    order, with a marker where the generation opens its upstream call."""
    seen: list[str] = []
    lock = threading.Lock()
    execute = CursorWrapper._execute_with_wrappers

    def recording(self, sql, params, many, executor):
        with lock:
            seen.append(sql)
        return execute(self, sql, params, many, executor)

    round_ = generation.upstream_round

    async def marked(*args, **kwargs):
        with lock:
            seen.append(UPSTREAM)
        return await round_(*args, **kwargs)

    monkeypatch.setattr(CursorWrapper, "_execute_with_wrappers", recording)
    monkeypatch.setattr(generation, "upstream_round", marked)
    return seen


def _before_upstream(seen: list[str]) -> list[str]:
    assert UPSTREAM in seen, "the turn never called upstream"
    return seen[: seen.index(UPSTREAM)]


def _reads(statements: list[str]) -> list[str]:
    return [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]


def _configuration_reads(statements: list[str]) -> list[str]:
    """Reads of anything but the turn's own conversation (its rows, its prompt)."""
    return [sql for sql in _reads(statements) if not TURN_OWN.search(sql.split(" FROM ", 1)[-1].split()[0])]


async def test_a_warm_socket_turn_reads_no_configuration_before_the_upstream_call(tenant_factory, chat, sim, statements):
    setup = await adb(tenant_factory)()
    await adb(SpendingCap.objects.create)(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("5"))
    await adb(policy_save)(tenant_id=setup.tenant.pk, blocked_terms=["forbidden"])
    token = await adb(setup.token)("user-1")
    async with chat(token) as socket:
        first = await socket.turn("hello")  # cold: the configuration is read and cached
        assert first[-1]["type"] == "message.completed"
        conversation_id = first[0]["id"]

        statements.clear()
        new = await socket.turn("a new conversation")
        assert new[-1]["type"] == "message.completed"
        before = _before_upstream(statements)
        # A new conversation: nothing is read at all — only the turn's own writes.
        assert _reads(before) == [], _reads(before)
        assert any(sql.lstrip().upper().startswith("INSERT") for sql in before)

        statements.clear()
        again = await socket.turn("and again", conversation_id=conversation_id)
        assert again[-1]["type"] == "message.completed"
        # An existing one: its own row and prompt, nothing of the configuration.
        assert _configuration_reads(_before_upstream(statements)) == []


async def _next_turn(socket, conversation_id: str, content: str = "again") -> dict:
    return (await socket.turn(content, conversation_id=conversation_id))[-1]


async def test_each_configuration_change_applies_to_the_very_next_socket_turn(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)("user-1")
    async with chat(token) as socket:
        conversation_id = (await socket.turn("hello"))[0]["id"]
        assert (await _next_turn(socket, conversation_id))["type"] == "message.completed"  # warm

        # The assistant: a new output bound reaches the provider on the next turn.
        setup.assistant.max_tokens = 77
        await adb(setup.assistant.save)()
        assert (await _next_turn(socket, conversation_id))["type"] == "message.completed"
        assert sim.requests[-1]["max_tokens"] == 77

        # The price: the next turn is billed at the new one.
        price = await adb(ModelPrice.objects.get)(model=setup.assistant.model, kind=ModelPrice.Kind.CHAT)
        price.output_per_million = Decimal("1000")
        await adb(price.save)()
        completed = await _next_turn(socket, conversation_id)
        output_cost = Decimal(completed["usage"]["completion_tokens"]) * Decimal("1000") / 1_000_000
        assert Decimal(completed["cost_usd"]) >= output_cost > 0

        # The content policy: the next turn's input is checked against it.
        await adb(policy_save)(tenant_id=setup.tenant.pk, blocked_terms=["forbidden"])
        refused = await _next_turn(socket, conversation_id, "something forbidden")
        assert refused["type"] == "error" and refused["code"] == "moderation_blocked"

        # A cap: the next turn is held against it (and refused when it cannot fit).
        await adb(SpendingCap.objects.create)(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("0"))
        requests_before = len(sim.requests)
        refused = await _next_turn(socket, conversation_id)
        assert refused["type"] == "error" and refused["code"] == "spending_cap_exceeded"
        assert len(sim.requests) == requests_before

        # The end user, blocked by a save: refused before anything else, even a new conversation.
        await adb(SpendingCap.objects.all().delete)()
        end_user = await adb(EndUser.objects.get)(tenant=setup.tenant, external_id="user-1")
        end_user.is_blocked = True
        await adb(end_user.save)()
        await socket.send({"type": "message.create", "content": "new", "client_msg_id": "c-9"})
        refused = await socket.receive_until("error")
        assert refused[-1]["code"] == "unauthorized"
    assert len(sim.requests) == requests_before


async def test_a_revoked_key_and_a_new_key_limit_apply_to_the_next_rest_turn(tenant_factory, sim):
    setup = await adb(tenant_factory)()

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {setup.api_key}")
    conversation_id = (await sync_to_async(api.post)("/api/v1/conversations/", {"end_user": "rest"}, format="json")).json()["id"]

    def post(content: str):
        return api.post(f"/api/v1/conversations/{conversation_id}/messages/", {"content": content}, format="json")

    post_off_loop = sync_to_async(post, thread_sensitive=False)  # the view runs the engine itself
    assert (await post_off_loop("hello")).status_code == 201
    assert (await post_off_loop("warm")).status_code == 201

    key = await adb(ApiKey.objects.get)(tenant=setup.tenant)
    key.rpm = 1  # none before: the key's counter starts with the next turn
    await adb(key.save)()
    assert (await post_off_loop("the one the key now allows")).status_code == 201
    refused = await post_off_loop("over the key's new limit")
    assert refused.status_code == 429, refused.content

    await adb(api_keys_revoke)(keys=ApiKey.objects.filter(tenant=setup.tenant))
    assert (await post_off_loop("revoked")).status_code == 401
    assert await adb(Conversation.objects.filter(tenant=setup.tenant).count)() == 1
