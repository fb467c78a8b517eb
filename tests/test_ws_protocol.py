"""The WebSocket chat protocol end to end: consumer, engine, real SDK, simulator over HTTP."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from billing.models import UsageRecord
from conversations.models import Conversation, Message
from tests.conftest import adb, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _messages(conversation_id):
    return list(Message.objects.filter(conversation_id=conversation_id).order_by("seq").values(
        "role", "content", "status", "tokens", "seq", "model", "finish_reason"
    ))


async def test_turn_events_arrive_in_contract_order(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        # Paced (10 ms a token), so the answer streams as several deltas: one generated all at
        # once reaches a reader that is a moment behind as one merged delta (streaming/deltas.py).
        events = await socket.turn("Hello there, assistant [[sim:tps=100]]", client_msg_id="c-1")

    types = [e["type"] for e in events]
    assert types[:3] == ["conversation", "message.accepted", "message.started"]
    assert set(types[3:-1]) == {"delta"} and len(types) > 5
    assert types[-1] == "message.completed"
    conversation_id = events[0]["id"]
    accepted, started, completed = events[1], events[2], events[-1]
    assert accepted["client_msg_id"] == "c-1"
    assert started["model"] == "gpt-4o-mini"
    assert all(e["message_id"] == started["message_id"] for e in events[3:])
    assert completed["finish_reason"] == "stop"
    assert set(completed["usage"]) == {"prompt_tokens", "completion_tokens", "cached_tokens"}

    stored = await adb(_messages)(conversation_id)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[0]["content"] == "Hello there, assistant [[sim:tps=100]]" and stored[0]["tokens"] > 0
    assert stored[1]["content"] == "".join(e["content"] for e in events if e["type"] == "delta")
    assert stored[1]["status"] == "complete"


async def test_second_turn_prompt_contains_the_first_turn(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        first = await socket.turn("My name is Ada")
        conversation_id = first[0]["id"]
        first_answer = "".join(e["content"] for e in first if e["type"] == "delta")
        second = await socket.turn("What is my name?", conversation_id=conversation_id)

    assert second[0]["type"] == "message.accepted"  # no new conversation event
    sent = sim.requests[-1]["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1]["content"] == "My name is Ada"
    assert sent[2]["content"] == first_answer
    assert sent[3]["content"] == "What is my name?"


async def test_usage_and_cost_recorded_once_per_call(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("Count my tokens please")
    completed = events[-1]

    records = await adb(lambda: list(UsageRecord.objects.filter(tenant=setup.tenant)))()
    assert len(records) == 1
    record = records[0]
    assert record.prompt_tokens == completed["usage"]["prompt_tokens"] == sim.stats.prompt_tokens
    assert record.completion_tokens == completed["usage"]["completion_tokens"] == sim.stats.completion_tokens
    assert not record.estimated
    # gpt-4o-mini: $0.30 / $1.20 per 1M tokens
    expected = (record.prompt_tokens * 0.30 + record.completion_tokens * 1.20) / 1_000_000
    assert float(record.cost_usd) == pytest.approx(expected)
    assert float(completed["cost_usd"]) == pytest.approx(expected)
    assert str(record.message_id) == completed["message_id"]
    assert record.ttft_ms is not None and record.latency_ms >= record.ttft_ms


@pytest.mark.parametrize(
    ("directive", "code"),
    [
        ("[[sim:status=500]]", "upstream_error"),
        ("[[sim:hang=1]]", "upstream_timeout"),
        ("[[sim:cut=3]]", "upstream_error"),
        ("[[sim:malformed=2]]", "upstream_error"),
    ],
)
async def test_failed_generation_keeps_user_message_and_incomplete_answer(
    tenant_factory, chat, sim, settings, directive, code
):
    settings.UPSTREAM_MAX_RETRIES = 0
    settings.UPSTREAM_FIRST_TOKEN_TIMEOUT = 0.5
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn(f"Please fail {directive}")
    error = events[-1]
    assert error["type"] == "error" and error["code"] == code
    streamed = "".join(e["content"] for e in events if e["type"] == "delta")

    stored = await adb(_messages)(events[0]["id"])
    assert [(m["role"], m["status"]) for m in stored] == [("user", "complete"), ("assistant", "incomplete")]
    assert stored[1]["content"] == streamed
    assert error["message_id"] == events[2]["message_id"]
    records = await adb(lambda: list(UsageRecord.objects.filter(tenant=setup.tenant)))()
    assert len(records) == 1 and records[0].outcome == "error"
    # What the provider served is billed, even when the stream fails; a refused request is $0.
    assert records[0].prompt_tokens == sim.stats.prompt_tokens
    assert records[0].completion_tokens == sim.stats.completion_tokens
    assert (records[0].prompt_tokens > 0) == (directive != "[[sim:status=500]]")


async def test_transient_upstream_failure_is_retried_before_first_token(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("Retry me [[sim:status=503 fail_times=2]]")
    assert events[-1]["type"] == "message.completed"
    assert sim.stats.requests == 3


async def test_cancel_stops_the_stream_and_keeps_what_streamed(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        await socket.send({"type": "message.create", "content": "Long one [[sim:words=400 tps=100]]"})
        events = await socket.receive_until("delta")
        conversation_id = events[0]["id"]
        await socket.send({"type": "generation.cancel", "conversation_id": conversation_id})
        events += await socket.receive_until("error", "message.completed")
    assert events[-1]["type"] == "error" and events[-1]["code"] == "cancelled", events[-1]
    streamed = "".join(e["content"] for e in events if e["type"] == "delta")
    assert 0 < len(streamed.split()) < 400

    stored = await adb(_messages)(conversation_id)
    assert stored[1]["status"] == "incomplete" and stored[1]["content"] == streamed
    record = await adb(lambda: UsageRecord.objects.get(tenant=setup.tenant))()
    assert record.outcome == "cancelled" and record.completion_tokens > 0


async def test_foreign_conversation_answers_like_a_missing_one(tenant_factory, chat, sim):
    ours, theirs = await adb(tenant_factory)(), await adb(tenant_factory)()
    async with chat(await adb(theirs.token)()) as socket:
        foreign_id = (await socket.turn("secret business"))[0]["id"]
    same_tenant_other_user = await adb(ours.token)("someone-else")
    async with chat(await adb(ours.token)()) as socket, chat(same_tenant_other_user) as other:
        own_id = (await other.turn("mine"))[0]["id"]
        answers = []
        for conversation_id in (foreign_id, str(uuid.uuid4()), own_id):
            for frame in (
                {"type": "message.create", "conversation_id": conversation_id, "content": "hi"},
                {"type": "conversation.join", "conversation_id": conversation_id},
                {"type": "generation.cancel", "conversation_id": conversation_id},
            ):
                await socket.send(frame)
                answers.append(await socket.receive())
    # Each answer names its own frame's request id (observability); otherwise they are identical.
    assert len({a.pop("request_id") for a in answers}) == len(answers)
    assert all(a == {"type": "error", "code": "not_found", "message": "conversation not found"} for a in answers)
    assert await adb(Message.objects.filter(conversation_id=foreign_id).count)() == 2


@pytest.mark.parametrize("kind", ["expired", "forged", "garbage", "missing"])
async def test_bad_tokens_are_refused(tenant_factory, chat, kind):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)("user-1", 3600)
    if kind == "expired":
        token = await adb(setup.token)("user-1", 1)
        await asyncio.sleep(1.1)
    elif kind == "forged":
        token = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    elif kind == "garbage":
        token = "not-a-token"
    elif kind == "missing":
        token = None
    async with chat(token) as socket:
        refusal = await socket.receive()
        assert refusal.pop("request_id")  # the socket's request id, as in its log lines
        assert refusal == {
            "type": "error", "code": "unauthorized", "message": "invalid or expired credentials"
        }
        closed = await socket.communicator.receive_output(timeout=1)
        assert closed == {"type": "websocket.close", "code": 4401}


async def test_blocked_end_user_is_refused(tenant_factory, chat):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)("troll")
    end_user = await adb(setup.end_user)("troll")
    end_user.is_blocked = True
    await adb(end_user.save)()
    async with chat(token) as socket:
        assert (await socket.receive())["code"] == "unauthorized"


@pytest.mark.parametrize(
    "frame",
    [
        "not json at all",
        "[1, 2, 3]",
        '{"type": "message.create"}',
        '{"type": "message.create", "content": ""}',
        '{"type": "message.create", "content": 42}',
        '{"type": "message.create", "content": "hi", "conversation_id": "nope"}',
        '{"type": "message.create", "content": "hi", "surprise": 1}',
        '{"type": "conversation.join"}',
        '{"type": "dance"}',
    ],
)
async def test_malformed_frames_are_refused_and_the_socket_keeps_working(tenant_factory, chat, sim, frame):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        await socket.send_text(frame)
        error = await socket.receive()
        assert error["type"] == "error" and error["code"] == "invalid_request" and error["message"]
        events = await socket.turn("still there?")
        assert events[-1]["type"] == "message.completed"


async def test_oversized_message_is_refused(tenant_factory, chat, settings):
    settings.MAX_MESSAGE_CHARS = 100
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        await socket.send({"type": "message.create", "content": "x" * 101})
        error = await socket.receive()
    assert error["code"] == "invalid_request" and "100" in error["message"]
    assert await adb(Message.objects.count)() == 0


async def test_one_generation_at_a_time_per_conversation(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        await socket.send({"type": "message.create", "content": "slow [[sim:words=40 tps=200]]"})
        events = await socket.receive_until("message.started")
        conversation_id = events[0]["id"]
        await socket.send({"type": "message.create", "conversation_id": conversation_id, "content": "again"})
        events = await socket.receive_until("error")
        assert events[-1]["code"] == "invalid_request" and "already" in events[-1]["message"]
        await socket.receive_until("message.completed")
        assert (await socket.turn("now", conversation_id=conversation_id))[-1]["type"] == "message.completed"


async def test_closed_socket_leaves_a_complete_billed_answer(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        await socket.send({"type": "message.create", "content": "keep going [[sim:words=30 tps=300]]"})
        conversation_id = (await socket.receive_until("delta"))[0]["id"]
    # The socket is gone; the answer still completes, is stored and billed.

    async def answered():
        stored = await adb(_messages)(conversation_id)
        return len(stored) == 2 and stored

    stored = await wait_for(answered, timeout=5)
    assert stored[1]["status"] == "complete" and len(stored[1]["content"].split()) == 30
    assert await adb(UsageRecord.objects.filter(tenant=setup.tenant, outcome="ok").count)() == 1


async def test_second_socket_joining_mid_stream_gets_partial_then_the_rest(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)()
    async with chat(token) as first:
        await first.send({"type": "message.create", "content": "tell me a story [[sim:words=60 tps=150]]"})
        events = await first.receive_until("delta")
        conversation_id = events[0]["id"]
        async with chat(token) as second:
            await second.send({"type": "conversation.join", "conversation_id": conversation_id})
            joined = await second.receive_until("message.completed")
        rest = await first.receive_until("message.completed")

    state = joined[0]
    assert state["type"] == "conversation.state" and state["generating"] is True
    assert state["message_id"] == events[2]["message_id"]
    later = "".join(e["content"] for e in joined if e["type"] == "delta")
    full = "".join(e["content"] for e in events + rest if e["type"] == "delta")
    assert state["content"] and state["content"] + later == full
    stored = await adb(_messages)(conversation_id)
    assert stored[1]["content"] == full


async def test_join_when_idle_reports_not_generating(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("hi")
        conversation_id = events[0]["id"]
        await socket.send({"type": "conversation.join", "conversation_id": conversation_id})
        assert await socket.receive() == {
            "type": "conversation.state", "conversation_id": conversation_id, "generating": False,
            "offset": events[-1]["offset"],  # the log's position the state describes
        }


async def test_cross_origin_socket_is_rejected(tenant_factory, chat):
    from channels.testing import WebsocketCommunicator

    from config.asgi import application

    setup = await adb(tenant_factory)()
    token = await adb(setup.token)()
    communicator = WebsocketCommunicator(
        application, f"/ws/chat/?token={token}", headers=[(b"origin", b"https://evil.example")]
    )
    connected, _ = await communicator.connect()
    assert not connected
    await communicator.disconnect()


async def test_provider_key_is_ciphertext_in_the_database(tenant_factory):
    from django.db import connection

    from tests.factories import PROVIDER_KEY

    setup = await adb(tenant_factory)()

    def raw():
        with connection.cursor() as cursor:
            cursor.execute("SELECT api_key FROM tenants_providercredential WHERE tenant_id = %s", [setup.tenant.pk])
            return cursor.fetchone()[0]

    stored = await adb(raw)()
    assert PROVIDER_KEY not in stored and "PLAINTEXT" not in stored and stored.startswith("gAAAA")
    assert await adb(lambda: setup.tenant.credentials.get().api_key)() == PROVIDER_KEY
    assert PROVIDER_KEY not in repr(await adb(lambda: setup.tenant.credentials.get())())


async def test_conversation_model_fields(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        conversation_id = (await socket.turn("A title for this chat"))[0]["id"]
    conversation = await adb(Conversation.objects.get)(id=conversation_id)
    assert conversation.title == "A title for this chat"
    assert conversation.generation_id is None and conversation.last_seq == 2


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "message.create", "content": "x" * 101, "client_msg_id": "c-9"},  # oversized content
        {"type": "message.create", "content": "", "client_msg_id": "c-9"},
        {"type": "message.create", "content": "hi", "conversation_id": "nope", "client_msg_id": "c-9"},
        {"type": "message.create", "content": "hi", "surprise": 1, "client_msg_id": "c-9"},
        '{"type": "message.create", "client_msg_id": "c-9", "content": "no closing brace"',  # not JSON
        '{"type": "message.create", "client_msg_id": "c-9", "content": "' + "y" * 5000 + '"}',  # frame too large
    ],
)
async def test_an_error_answering_a_frame_echoes_its_client_msg_id(tenant_factory, chat, settings, frame):
    settings.MAX_MESSAGE_CHARS = 100
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        await (socket.send(frame) if isinstance(frame, dict) else socket.send_text(frame))
        error = await socket.receive()
    assert error["type"] == "error" and error["code"] == "invalid_request"
    assert error["client_msg_id"] == "c-9"


async def test_a_refused_turn_echoes_its_client_msg_id(tenant_factory, chat):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        await socket.send({
            "type": "message.create", "content": "hi", "conversation_id": str(uuid.uuid4()), "client_msg_id": "c-7"
        })
        error = await socket.receive()
    assert error["code"] == "not_found" and error["client_msg_id"] == "c-7"
