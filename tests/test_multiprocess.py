"""Two Daphne processes sharing PostgreSQL and Redis serve one tenant's conversation.

A generation started through process A is joined, watched and cancelled through process B:
the event log in Redis and the channel layer (cancel), not process memory, carry every event. Needs the Redis channel layer
and a database other processes can open, so it runs in services mode (CI) only.
"""

from __future__ import annotations

import json

import pytest
import websockets
from django.conf import settings

from conversations.models import Message
from tests.conftest import adb
from tests.webprocs import events_until, web_processes

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not (settings.REDIS_URL and settings.SERVICES_MODE),
        reason="needs the Redis channel layer and PostgreSQL shared between processes",
    ),
]


async def test_two_processes_share_one_conversation(tenant_factory, sim):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)()
    origin = {"Origin": "http://127.0.0.1"}
    with web_processes(2) as [(port_a, _), (port_b, _)]:
        async with (
            websockets.connect(f"ws://127.0.0.1:{port_a}/ws/chat/?token={token}", additional_headers=origin) as a,
            websockets.connect(f"ws://127.0.0.1:{port_b}/ws/chat/?token={token}", additional_headers=origin) as b,
        ):
            # A generation started in process A, joined mid-stream through process B.
            await a.send(json.dumps({"type": "message.create", "content": "story [[sim:words=60 tps=120]]"}))
            started = await events_until(a, "delta", timeout=10)
            conversation_id = started[0]["id"]
            await b.send(json.dumps({"type": "conversation.join", "conversation_id": conversation_id}))
            seen_by_b = await events_until(b, "message.completed", timeout=10)
            seen_by_a = started + await events_until(a, "message.completed", timeout=10)

            state = seen_by_b[0]
            assert state["type"] == "conversation.state" and state["generating"] is True
            full = "".join(e["content"] for e in seen_by_a if e["type"] == "delta")
            assert state["content"] + "".join(e["content"] for e in seen_by_b if e["type"] == "delta") == full
            assert seen_by_b[-1] == seen_by_a[-1]

            # A cancel sent to process B stops the generation running in process A.
            await a.send(json.dumps({
                "type": "message.create", "conversation_id": conversation_id,
                "content": "again [[sim:words=400 tps=100]]",
            }))
            await events_until(a, "delta", timeout=10)
            await b.send(json.dumps({"type": "generation.cancel", "conversation_id": conversation_id}))
            ended_a = await events_until(a, "error", "message.completed", timeout=10)
            assert ended_a[-1]["code"] == "cancelled"

    stored = await adb(lambda: list(
        Message.objects.filter(conversation_id=conversation_id).order_by("seq").values_list("role", "status")
    ))()
    assert stored == [("user", "complete"), ("assistant", "complete"), ("user", "complete"), ("assistant", "incomplete")]
