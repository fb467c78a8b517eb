"""History over the chat socket: list the caller's conversations, read one back newest first,
rename and delete; strictly the caller's own, validated like every other frame."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import UsageRecord
from conversations.models import Conversation, Message
from tests.conftest import adb

pytestmark = pytest.mark.django_db(transaction=True)


async def _ask(socket, frame):
    await socket.send(frame)
    return await socket.receive()


async def _conversation(socket, content="Hello there", **fields):
    events = await socket.turn(content, **fields)
    assert events[-1]["type"] == "message.completed", events[-1]
    return events


async def test_list_shows_the_callers_conversations_newest_first_with_a_cursor(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        ids = [(await _conversation(socket, f"question {n}"))[0]["id"] for n in range(3)]
        first = await _ask(socket, {"type": "conversations.list", "before": None, "limit": 2, "client_msg_id": "l1"})
        second = await _ask(socket, {"type": "conversations.list", "before": first["next"], "limit": 2})
        default = await _ask(socket, {"type": "conversations.list"})

    assert first["type"] == "conversations" and first["client_msg_id"] == "l1"
    assert [item["id"] for item in first["items"] + second["items"]] == ids[::-1]
    assert isinstance(first["next"], str) and second["next"] is None and "client_msg_id" not in second
    item = first["items"][0]
    assert set(item) == {"id", "title", "assistant", "updated_at", "generating"}
    assert item["assistant"] == setup.assistant.slug and item["generating"] is False
    assert item["title"] == "question 2"  # a new conversation is titled after its first message
    assert item["updated_at"].endswith("Z")
    assert [item["id"] for item in default["items"]] == ids[::-1] and default["next"] is None


async def test_list_cursor_neither_skips_nor_repeats_conversations_updated_at_the_same_instant(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        for n in range(4):
            await _conversation(socket, f"q {n}")
        same = timezone.now()
        await adb(lambda: Conversation.objects.filter(tenant=setup.tenant).update(updated_at=same))()
        seen, before = [], None
        while True:
            page = await _ask(socket, {"type": "conversations.list", "before": before, "limit": 1})
            seen += [item["id"] for item in page["items"]]
            if (before := page["next"]) is None:
                break
    assert len(seen) == len(set(seen)) == 4
    assert seen == sorted(seen, reverse=True)


async def test_list_reports_a_conversation_that_is_generating(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        await socket.send({"type": "message.create", "content": "a long story [[sim:words=80 tps=100]]"})
        await socket.receive_until("delta")
        listed = await _ask(socket, {"type": "conversations.list"})
        while listed["type"] != "conversations":  # deltas of the running answer come between
            listed = await socket.receive()
        await socket.receive_until("message.completed")
    assert listed["items"][0]["generating"] is True


async def test_read_returns_messages_newest_first_with_usage_from_the_ledger(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        first = await _conversation(socket, "one")
        conversation_id = first[0]["id"]
        second = await _conversation(socket, "two", conversation_id=conversation_id)
        page = await _ask(socket, {"type": "conversation.read", "conversation_id": conversation_id,
                                   "before": None, "limit": 3, "client_msg_id": "r1"})
        rest = await _ask(socket, {"type": "conversation.read", "conversation_id": conversation_id,
                                   "before": page["next"], "limit": 3})

    assert page["type"] == "conversation.messages" and page["conversation_id"] == conversation_id
    assert page["client_msg_id"] == "r1"
    messages = page["messages"] + rest["messages"]
    assert [m["seq"] for m in messages] == [4, 3, 2, 1] and page["next"] == 2 and rest["next"] is None
    assert [m["role"] for m in messages] == ["assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "two" and messages[3]["content"] == "one"
    completed = second[-1]
    newest = messages[0]
    assert newest["id"] == completed["message_id"] and newest["status"] == "complete"
    assert newest["content"] == "".join(e["content"] for e in second if e["type"] == "delta")
    assert newest["usage"] == completed["usage"] and newest["cost_usd"] == completed["cost_usd"]
    assert newest["model"] == "gpt-4o-mini" and newest["created_at"].endswith("Z")
    assert messages[2]["cost_usd"] == first[-1]["cost_usd"]
    assert "usage" not in messages[1] and "cost_usd" not in messages[1] and "tool_calls" not in messages[1]
    assert "cached" not in newest


async def test_read_shows_tool_calls_and_leaves_out_tool_results(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)(tools=["calculator"])
    async with chat(await adb(setup.token)()) as socket:
        events = await _conversation(socket, 'What is 6*7? [[sim:tool=calculator args={"expression":"6*7"}]]')
        page = await _ask(socket, {"type": "conversation.read", "conversation_id": events[0]["id"]})
    assert [m["role"] for m in page["messages"]] == ["assistant", "assistant", "user"]
    call = page["messages"][1]
    assert call["tool_calls"][0]["function"]["name"] == "calculator"
    assert call["usage"]["completion_tokens"] > 0  # the tool round's own upstream call
    records = await adb(lambda: list(UsageRecord.objects.filter(tenant=setup.tenant, kind="chat")))()
    total = sum(Decimal(m.get("cost_usd", "0")) for m in page["messages"])
    assert total == sum(r.cost_usd for r in records) == Decimal(events[-1]["cost_usd"])


async def test_cached_answers_say_so(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        events = await _conversation(socket, "remember this")
        await adb(lambda: Message.objects.filter(id=events[-1]["message_id"]).update(cached=True))()
        page = await _ask(socket, {"type": "conversation.read", "conversation_id": events[0]["id"]})
    assert page["messages"][0]["cached"] is True


async def test_rename_and_delete(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        conversation_id = (await _conversation(socket))[0]["id"]
        renamed = await _ask(socket, {"type": "conversation.rename", "conversation_id": conversation_id,
                                      "title": "  Trip to Lisbon ", "client_msg_id": "n1"})
        listed = await _ask(socket, {"type": "conversations.list"})
        deleted = await _ask(socket, {"type": "conversation.delete", "conversation_id": conversation_id,
                                      "client_msg_id": "d1"})
        after = await _ask(socket, {"type": "conversation.read", "conversation_id": conversation_id})
        empty = await _ask(socket, {"type": "conversations.list"})

    assert renamed == {"type": "conversation.renamed", "conversation_id": conversation_id,
                       "title": "Trip to Lisbon", "client_msg_id": "n1"}
    assert listed["items"][0]["title"] == "Trip to Lisbon"
    assert deleted == {"type": "conversation.deleted", "conversation_id": conversation_id, "client_msg_id": "d1"}
    assert after["type"] == "error" and after["code"] == "not_found"
    assert empty == {"type": "conversations", "items": [], "next": None}
    assert not await adb(Conversation.objects.filter(id=conversation_id).exists)()


async def test_delete_is_refused_while_a_reply_is_generated(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        conversation_id = (await _conversation(socket))[0]["id"]
        await adb(lambda: Conversation.objects.filter(id=conversation_id).update(
            generation_id=uuid.uuid4(), generation_started_at=timezone.now(), generation_beat_at=timezone.now()
        ))()
        refused = await _ask(socket, {"type": "conversation.delete", "conversation_id": conversation_id,
                                      "client_msg_id": "d2"})
    assert refused["type"] == "error" and refused["code"] == "invalid_request" and refused["client_msg_id"] == "d2"
    assert await adb(Conversation.objects.filter(id=conversation_id).exists)()


async def test_another_end_users_conversation_answers_like_a_missing_one(tenant_factory, chat, sim):
    ours, theirs = await adb(tenant_factory)(), await adb(tenant_factory)()
    async with chat(await adb(ours.token)("someone-else")) as socket:
        same_tenant = (await _conversation(socket))[0]["id"]
    async with chat(await adb(theirs.token)()) as socket:
        other_tenant = (await _conversation(socket))[0]["id"]
    async with chat(await adb(ours.token)()) as socket:
        listed = await _ask(socket, {"type": "conversations.list"})
        answers = []
        for conversation_id in (same_tenant, other_tenant, str(uuid.uuid4())):
            for frame in (
                {"type": "conversation.read"},
                {"type": "conversation.rename", "title": "mine now"},
                {"type": "conversation.delete"},
            ):
                answer = await _ask(socket, {**frame, "conversation_id": conversation_id})
                answers.append((answer["type"], answer["code"], answer["message"]))
    assert listed["items"] == []
    assert set(answers) == {("error", "not_found", "conversation not found")}
    titles = await adb(lambda: set(Conversation.objects.values_list("title", flat=True)))()
    assert "mine now" not in titles and await adb(Conversation.objects.count)() == 2


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "conversations.list", "after": None},
        {"type": "conversations.list", "limit": 0},
        {"type": "conversations.list", "limit": 101},
        {"type": "conversations.list", "limit": "5"},
        {"type": "conversations.list", "limit": True},
        {"type": "conversations.list", "before": 5},
        {"type": "conversations.list", "before": "not-a-cursor"},
        {"type": "conversation.read"},
        {"type": "conversation.read", "conversation_id": "nope"},
        {"type": "conversation.read", "conversation_id": str(uuid.uuid4()), "before": "3"},
        {"type": "conversation.read", "conversation_id": str(uuid.uuid4()), "before": 0},
        {"type": "conversation.read", "conversation_id": str(uuid.uuid4()), "title": "x"},
        {"type": "conversation.rename", "conversation_id": str(uuid.uuid4())},
        {"type": "conversation.rename", "conversation_id": str(uuid.uuid4()), "title": "x" * 201},
        {"type": "conversation.rename", "conversation_id": str(uuid.uuid4()), "title": "a\u0000b"},
        {"type": "conversation.delete", "conversation_id": str(uuid.uuid4()), "limit": 1},
    ],
)
async def test_malformed_history_frames_are_invalid_requests_and_the_socket_stays_open(
    tenant_factory, chat, sim, frame
):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        answer = await _ask(socket, {**frame, "client_msg_id": "bad-1"})
        still_open = await _ask(socket, {"type": "conversations.list", "limit": 100})
    assert answer["type"] == "error" and answer["code"] == "invalid_request"
    assert answer["client_msg_id"] == "bad-1" and "offset" not in answer
    assert still_open["type"] == "conversations"
