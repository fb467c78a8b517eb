"""Sockets read the conversation's event log: every event frame carries its offset, and a
client that reconnects with the last offset it saw gets every later event, exactly once."""

from __future__ import annotations

import pytest

from conversations.models import Message
from streaming.eventlog import offset_key
from tests.conftest import adb, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _answer(conversation_id) -> str:
    return Message.objects.get(conversation_id=conversation_id, role="assistant").content


def _text(events) -> str:
    return "".join(e["content"] for e in events if e["type"] == "delta")


async def test_every_event_frame_carries_an_increasing_offset(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("hello [[sim:words=12]]")
    offsets = [offset_key(e["offset"]) for e in events]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(events)


async def test_reconnect_with_last_offset_replays_exactly_the_missed_events(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)()
    async with chat(token) as first:
        await first.send({"type": "message.create", "content": "a story [[sim:words=80 tps=200]]"})
        seen = await first.receive_until("delta")
        seen += [await first.receive() for _ in range(3)]
    # The first socket is gone mid-stream; the generation goes on without it.
    conversation_id, last = seen[0]["id"], seen[-1]["offset"]
    async with chat(token) as second:
        await second.send({"type": "conversation.join", "conversation_id": conversation_id, "after": last})
        state = await second.receive()
        missed = await second.receive_until("message.completed")

    assert state["type"] == "conversation.state" and "content" not in state
    assert all(offset_key(e["offset"]) > offset_key(last) for e in missed)
    assert len({e["offset"] for e in missed}) == len(missed)
    answer = await wait_for(lambda: adb(_answer)(conversation_id))
    assert _text(seen) + _text(missed) == answer  # nothing lost, nothing twice


async def test_join_with_offset_after_the_answer_finished_still_gets_its_end(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)()
    async with chat(token) as socket:
        events = await socket.turn("hi [[sim:words=10 tps=20]]")  # paced: several deltas
    conversation_id = events[0]["id"]
    cut = next(i for i, e in enumerate(events) if e["type"] == "delta")  # the client saw the first delta only
    async with chat(token) as again:
        await again.send({"type": "conversation.join", "conversation_id": conversation_id, "after": events[cut]["offset"]})
        state = await again.receive()
        replayed = await again.receive_until("message.completed")
        assert await again.nothing_more()
    assert state["generating"] is False
    # Read all at once, the rest of the answer comes as merged deltas: the same text, the same
    # other events, and the last delta at the offset of the last one it carries.
    rest = events[cut + 1:]
    assert _text(replayed) == _text(rest) != ""
    assert [e for e in replayed if e["type"] != "delta"] == [e for e in rest if e["type"] != "delta"]
    assert [e for e in replayed if e["type"] == "delta"][-1]["offset"] == [e for e in rest if e["type"] == "delta"][-1]["offset"]


async def test_join_without_offset_gets_state_then_only_later_events(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)()
    async with chat(token) as first:
        await first.send({"type": "message.create", "content": "go on [[sim:words=60 tps=150]]"})
        events = await first.receive_until("delta")
        async with chat(token) as second:
            await second.send({"type": "conversation.join", "conversation_id": events[0]["id"]})
            joined = await second.receive_until("message.completed")
        events += await first.receive_until("message.completed")
    state = joined[0]
    assert state["generating"] is True
    assert all(offset_key(e["offset"]) > offset_key(state["offset"]) for e in joined[1:])
    assert state["content"] + _text(joined) == _text(events)


@pytest.mark.parametrize("after", ["", "latest", 5, "1-2-3"])
async def test_malformed_offset_is_an_invalid_request(tenant_factory, chat, sim, after):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        conversation_id = (await socket.turn("hi"))[0]["id"]
        await socket.send({"type": "conversation.join", "conversation_id": conversation_id, "after": after})
        assert (await socket.receive())["code"] == "invalid_request"
