"""The event log's semantics, the same in both backends: offsets, order, reads after an offset
exactly once, blocking reads, and a slow reader that falls far behind still gets everything."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.conf import settings

from streaming.eventlog import START, MemoryEventLog, RedisEventLog, offset_key, read_all

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.skipif(
    not settings.REDIS_URL, reason="the Redis Stream backend runs in services mode (CI)"
))]


@pytest.fixture(params=BACKENDS)
def log(request):
    return MemoryEventLog() if request.param == "memory" else RedisEventLog(settings.REDIS_URL)


@pytest.fixture
def key():
    return f"parley:test-log:{uuid.uuid4()}"


async def test_offsets_grow_and_events_read_back_in_order(log, key):
    offsets = [await log.append(key, {"n": n}) for n in range(5)]
    assert offsets == sorted(offsets, key=offset_key) and len(set(offsets)) == 5
    assert await log.read(key, START) == [(o, {"n": n}) for n, o in enumerate(offsets)]
    assert await log.head(key) == offsets[-1]


async def test_read_after_an_offset_returns_each_later_event_exactly_once(log, key):
    offsets = [await log.append(key, {"n": n}) for n in range(6)]
    seen = []
    after = offsets[2]
    while page := await log.read(key, after, count=2):
        seen.extend(event["n"] for _, event in page)
        after = page[-1][0]
    assert seen == [3, 4, 5]
    assert await log.read(key, offsets[-1]) == []


async def test_empty_or_missing_log_reads_nothing(log, key):
    assert await log.read(key, START) == []
    assert await log.head(key) == START


async def test_blocking_read_wakes_on_append_and_times_out_without_one(log, key):
    assert await log.read(key, START, block_ms=50) == []
    waiting = asyncio.create_task(log.read(key, START, block_ms=5000))
    await asyncio.sleep(0.05)
    offset = await log.append(key, {"hello": "world"})
    assert await asyncio.wait_for(waiting, timeout=2) == [(offset, {"hello": "world"})]


async def test_slow_reader_a_thousand_events_behind_gets_all_of_them(log, key):
    """The writer never waits for the reader: 1,200 events are appended while the reader is
    stuck, then the reader catches up from its offset, in order, nothing twice."""
    first = await log.append(key, {"n": 0})
    for n in range(1, 1200):
        await log.append(key, {"n": n})
    seen = [0]
    after = first
    while page := await log.read(key, after, block_ms=100, count=300):
        seen.extend(event["n"] for _, event in page)
        after = page[-1][0]
    assert seen == list(range(1200))
    assert len(await read_all(log, key)) == 1200


async def test_log_is_capped_near_its_maximum_length(log, key, settings):
    settings.EVENT_LOG_MAXLEN = 100
    for n in range(1000):
        await log.append(key, {"n": n})
    kept = await read_all(log, key)
    # Redis trims whole nodes ("MAXLEN ~"): about the cap, never below it, the newest kept.
    assert 100 <= len(kept) < 500 and kept[-1][1] == {"n": 999}


async def test_readers_on_other_event_loops_are_woken(key):
    """Embedded mode: the live test server runs its loop in another thread."""
    log = MemoryEventLog()
    result: list = []

    def reader() -> None:
        result.extend(asyncio.run(log.read(key, START, block_ms=5000)))

    import threading

    thread = threading.Thread(target=reader)
    thread.start()
    await asyncio.sleep(0.1)
    await log.append(key, {"from": "another loop"})
    await asyncio.to_thread(thread.join, 5)
    assert [event for _, event in result] == [{"from": "another loop"}]


async def test_concurrent_writers_each_keep_their_order(log, key):
    """Many generations append at once (Redis: batched into shared pipelines)."""

    async def writer(name: int) -> list[str]:
        return [await log.append(key, {"w": name, "n": n}) for n in range(20)]

    offsets = await asyncio.gather(*(writer(w) for w in range(50)))
    for own in offsets:
        assert own == sorted(own, key=offset_key)
    events = [event for _, event in await read_all(log, key)]
    assert len(events) == 1000
    for w in range(50):
        assert [e["n"] for e in events if e["w"] == w] == list(range(20))
