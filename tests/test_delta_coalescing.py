"""A reader that is behind gets consecutive deltas of a message merged into one frame (at the
last merged offset, so resuming stays exactly-once); one that keeps up gets a frame per token;
a generation whose appends queue behind a slow log appends them merged."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from conversations import engine
from conversations.models import Message
from streaming import deltas, eventlog
from streaming.eventlog import START, MemoryEventLog, offset_key
from streaming.outages import EventOutbox
from tests.conftest import adb, wait_for


def delta(message_id: str, content: str) -> dict:
    return {"type": "delta", "message_id": message_id, "content": content}


def test_runs_of_one_messages_deltas_merge_at_their_last_offset():
    entries = [
        ("0-1", {"type": "message.started", "message_id": "m"}),
        ("0-2", delta("m", "a")), ("0-3", delta("m", "b")),
        ("0-4", {"type": "tool.call", "message_id": "m"}),
        ("0-5", delta("m", "c")), ("0-6", delta("other", "x")), ("0-7", delta("other", "y")),
    ]
    assert deltas.entries_coalesce(entries) == [
        ("0-1", {"type": "message.started", "message_id": "m"}),
        ("0-3", delta("m", "ab")),
        ("0-4", {"type": "tool.call", "message_id": "m"}),
        ("0-5", delta("m", "c")),
        ("0-7", delta("other", "xy")),
    ]


def test_a_merged_delta_stays_under_its_cap():
    word = "w" * 100
    entries = [(f"0-{i}", delta("m", word)) for i in range(1, 101)]
    merged = deltas.entries_coalesce(entries)
    assert all(len(event["content"]) <= deltas.MAX_CHARS for _, event in merged) and len(merged) == 3
    assert "".join(event["content"] for _, event in merged) == word * 100
    assert [offset for offset, _ in merged] == ["0-40", "0-80", "0-100"]


async def _read(key: str, after: str, until: str) -> list[eventlog.Entry]:
    got: list[eventlog.Entry] = []
    async with asyncio.timeout(10):
        async for entry in engine.events_follow(key, after):
            got.append(entry)
            if entry[0] == until:
                return got
    return got


@pytest.mark.django_db
async def test_reader_behind_gets_merged_deltas_and_resumes_from_their_offsets_exactly_once():
    log, key = eventlog.event_log(), f"parley:test-coalesce:{uuid.uuid4()}"
    words = [f"w{i} " for i in range(1000)]  # a reader 1,000 events behind
    for word in words:
        last = await log.append(key, delta("m", word))
    frames = await _read(key, START, last)
    assert "".join(event["content"] for _, event in frames) == "".join(words)
    assert len(frames) < 10 and frames[-1][0] == last
    # A client that saw only the first frame resumes from its offset: the rest, nothing twice.
    rest = await _read(key, frames[0][0], last)
    assert frames[0][1]["content"] + "".join(event["content"] for _, event in rest) == "".join(words)
    assert all(offset_key(offset) > offset_key(frames[0][0]) for offset, _ in rest)


class HeldLog(MemoryEventLog):
    """A log whose first append is out until `release` is set (a slow round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def append(self, key: str, event: dict) -> str:
        await self.release.wait()
        return await super().append(key, event)


async def test_deltas_queued_behind_a_slow_append_go_to_the_log_as_one(monkeypatch):
    log = HeldLog()
    monkeypatch.setattr(eventlog, "_log", log)
    outbox, key = EventOutbox("k"), "k"
    await outbox.append(delta("m", "0 "), wait=False)
    await asyncio.sleep(0)  # the send starts: nothing else queued, this delta goes alone
    for i in range(1, 30):  # the generation reads on while that append is out
        await outbox.append(delta("m", f"{i} "), wait=False)
    log.release.set()
    await outbox.append({"type": "message.completed", "message_id": "m"})  # waits for all before it
    entries = await eventlog.read_all(log, key)
    assert [event["type"] for _, event in entries] == ["delta", "delta", "message.completed"]
    assert entries[0][1]["content"] == "0 "
    assert "".join(event["content"] for _, event in entries[:-1]) == "".join(f"{i} " for i in range(30))
    assert outbox.pending == [] and await outbox.drain()


@pytest.mark.django_db(transaction=True)
async def test_reader_that_keeps_up_gets_a_frame_per_token_and_a_late_joiner_the_same_text(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    token = await adb(setup.token)()
    async with chat(token) as socket:
        events = await socket.turn("hello [[sim:words=8 tps=10]]")  # 100 ms between tokens
        conversation_id = events[0]["id"]
        streamed = [e for e in events if e["type"] == "delta"]
        # Joined after the answer, the whole log is one page: merged, the same text.
        await socket.send({"type": "conversation.join", "conversation_id": conversation_id, "after": START})
        await socket.receive()  # the state
        replayed = await socket.receive_until("message.completed")
    answer = await wait_for(lambda: adb(
        lambda: Message.objects.get(conversation_id=conversation_id, role="assistant").content
    )())
    assert len(streamed) == 8 and "".join(e["content"] for e in streamed) == answer
    merged = [e for e in replayed if e["type"] == "delta"]
    assert len(merged) == 1 and merged[0]["content"] == answer and merged[0]["offset"] == streamed[-1]["offset"]
