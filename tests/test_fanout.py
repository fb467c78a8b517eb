"""The fan-out: one dispatcher per event loop reads every followed log and hands each follower
every event after its offset, in order, exactly once — in both backends."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from django.conf import settings

from streaming.eventlog import START, MemoryEventLog, RedisEventLog
from streaming.fanout import Fanout

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.skipif(
    not settings.REDIS_URL, reason="the Redis Stream backend runs in services mode (CI)"
))]


@pytest.fixture(params=BACKENDS)
def log(request):
    return MemoryEventLog() if request.param == "memory" else RedisEventLog(settings.REDIS_URL)


def new_key() -> str:
    return f"parley:test-fanout:{uuid.uuid4()}"


async def collect(fanout: Fanout, key: str, count: int, *, after: str = START, pause: asyncio.Event | None = None) -> list[int]:
    """The `n` of the first `count` events after `after`; with `pause`, stalls after the first
    event until it is set (a slow socket)."""
    seen: list[int] = []
    async for _, event in fanout.follow(key, after):
        seen.append(event["n"])
        if pause is not None and len(seen) == 1:
            await pause.wait()
        if len(seen) == count:
            return seen
    return seen


async def started(fanout: Fanout, key: str, count: int) -> int:
    """Wait until `count` followers of `key` are registered."""
    async with asyncio.timeout(5):
        while len(fanout.followers.get(key, ())) < count:
            await asyncio.sleep(0.01)
    return count


async def test_many_followers_of_many_logs_each_get_every_event_in_order_once(log):
    fanout = Fanout(log)
    keys = [new_key() for _ in range(40)]
    readers = [asyncio.create_task(collect(fanout, key, 30)) for key in keys for _ in range(2)]
    for key in keys:
        await started(fanout, key, 2)
    for n in range(30):  # interleaved across the logs, as concurrent generations append
        await asyncio.gather(*(log.append(key, {"n": n}) for key in keys))
    results = await asyncio.wait_for(asyncio.gather(*readers), timeout=20)
    assert results == [list(range(30))] * 80


@pytest.mark.parametrize("buffer", [10, 1000])
async def test_slow_follower_far_behind_still_gets_every_event(log, settings, buffer):
    """1,500 events go by while one follower is stuck on its first: past its buffer it reads
    the gap from the log; the other follower of the same log is not held up."""
    settings.EVENT_FANOUT_BUFFER = buffer
    fanout, key, pause = Fanout(log), new_key(), asyncio.Event()
    slow = asyncio.create_task(collect(fanout, key, 1500, pause=pause))
    fast = asyncio.create_task(collect(fanout, key, 1500))
    await started(fanout, key, 2)
    for n in range(1500):
        await log.append(key, {"n": n})
    assert await asyncio.wait_for(fast, timeout=20) == list(range(1500))
    assert not slow.done()
    pause.set()
    assert await asyncio.wait_for(slow, timeout=20) == list(range(1500))


async def test_follower_added_while_the_dispatcher_waits_gets_its_events_promptly(log):
    fanout, quiet, busy = Fanout(log), new_key(), new_key()
    waiting = asyncio.create_task(collect(fanout, quiet, 1))
    await started(fanout, quiet, 1)
    await asyncio.sleep(0.05)  # the dispatcher is in its blocking read of `quiet` alone
    late = asyncio.create_task(collect(fanout, busy, 1))
    await started(fanout, busy, 1)
    await log.append(busy, {"n": 7})
    assert await asyncio.wait_for(late, timeout=1) == [7]
    waiting.cancel()


async def test_follower_resuming_from_an_offset_gets_what_came_after_it(log):
    """A join with an offset: what is already in the log, then what is appended."""
    fanout, key = Fanout(log), new_key()
    offsets = [await log.append(key, {"n": n}) for n in range(5)]
    live = asyncio.create_task(collect(fanout, key, 8))
    await started(fanout, key, 1)
    await log.append(key, {"n": 5})
    resumed = asyncio.create_task(collect(fanout, key, 4, after=offsets[2]))
    await started(fanout, key, 2)
    for n in (6, 7):
        await log.append(key, {"n": n})
    assert await asyncio.wait_for(resumed, timeout=5) == [3, 4, 5, 6]
    assert await asyncio.wait_for(live, timeout=5) == list(range(8))


async def test_cancelled_follower_leaves_the_others_untouched(log):
    fanout, shared, other = Fanout(log), new_key(), new_key()
    leaving = asyncio.create_task(collect(fanout, shared, 100))
    staying = asyncio.create_task(collect(fanout, shared, 20))
    elsewhere = asyncio.create_task(collect(fanout, other, 20))
    await started(fanout, shared, 2)
    await started(fanout, other, 1)
    for n in range(20):
        if n == 10:
            leaving.cancel()
            await asyncio.wait([leaving])
        await asyncio.gather(log.append(shared, {"n": n}), log.append(other, {"n": n}))
    assert await asyncio.wait_for(staying, timeout=5) == list(range(20))
    assert await asyncio.wait_for(elsewhere, timeout=5) == list(range(20))
    assert fanout.followers == {}  # every follower gone, nothing left to read
