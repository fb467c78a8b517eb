"""SIGKILL of a web process mid-stream: no answer, token or hold is lost with it (sockets and
`/v1`: for `/v1`, the process's liveness record and the process sweep, billing/processes.py).

Two real web processes share PostgreSQL and Redis; the one generating is killed outright.
Its generation's heartbeat stops; the sweep (beat here, or a join or a turn) stores what
streamed as `incomplete`, bills it once, releases the hold, frees the conversation and ends
the log with an error that sockets on the other process receive. Heartbeats and staleness are
made small through the environment so this takes seconds. Services mode only: the processes
share the test's PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx2
import openai
import pytest
import websockets
from django.conf import settings
from django.core.management import call_command

from billing.models import CapPeriod, Reservation, UsageRecord
from billing.tasks import processes_recover_stale
from conversations.models import Conversation, Message
from conversations.tasks import generations_recover_stale
from llm.tokens import count_text
from tests.conftest import adb
from tests.webprocs import events_until, tenant_capped, web_processes

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not (settings.REDIS_URL and settings.SERVICES_MODE),
        reason="kills real web processes, which need PostgreSQL and Redis shared with the test and each other",
    ),
]

STALE_SECONDS = 2
FAST_HEARTBEATS = {"GENERATION_HEARTBEAT_SECONDS": "0.5", "GENERATION_STALE_SECONDS": str(STALE_SECONDS)}




def _deltas(events: list[dict]) -> str:
    return "".join(e["content"] for e in events if e["type"] == "delta")


def _nothing_held() -> None:
    assert not Reservation.objects.filter(status="held").exists()
    assert all(p.reserved_usd == 0 for p in CapPeriod.objects.all())
    call_command("reconcile_caps")  # SystemExit(1) on drift between counters and ledger


async def test_sigkill_mid_stream_socket_answer_is_stored_billed_and_freed(tenant_factory, sim, settings):
    settings.GENERATION_STALE_SECONDS = STALE_SECONDS  # this process plays beat
    setup = await adb(tenant_capped)(tenant_factory)
    token = await adb(setup.token)()
    with web_processes(2, **FAST_HEARTBEATS) as [(port_a, process_a), (port_b, _)]:
        async with websockets.connect(f"ws://127.0.0.1:{port_a}/ws/chat/?token={token}") as a:
            await a.send(json.dumps({"type": "message.create", "content": "story [[sim:words=400 tps=20]]"}))
            seen_by_a = await events_until(a, "delta")
            for _ in range(5):
                seen_by_a += await events_until(a, "delta")
            conversation_id = seen_by_a[0]["id"]
            [answer_id] = [e["message_id"] for e in seen_by_a if e["type"] == "message.started"]
            first = next(i for i, e in enumerate(seen_by_a) if e["type"] == "delta")
            process_a.kill()
        url_b = f"ws://127.0.0.1:{port_b}/ws/chat/?token={token}"
        async with websockets.connect(url_b) as live, websockets.connect(url_b) as late:
            # Joined while the dead claim is still fresh: generating, with the answer so far.
            await live.send(json.dumps({"type": "conversation.join", "conversation_id": conversation_id}))
            state = json.loads(await live.recv())
            assert state["generating"] is True and state["content"].startswith(_deltas(seen_by_a))
            # Beat's sweep, once the heartbeat is stale: the joined socket gets the terminal event.
            await asyncio.sleep(STALE_SECONDS + 0.5)
            assert await adb(generations_recover_stale)() == 1
            ended = await events_until(live, "error", timeout=10)
            assert ended[-1]["message_id"] == answer_id
            # A client that resumes from an offset gets every event after it, then the same end.
            await late.send(json.dumps({"type": "conversation.join", "conversation_id": conversation_id,
                                        "after": seen_by_a[first]["offset"]}))
            replayed = await events_until(late, "error", timeout=10)
            assert replayed[0]["generating"] is False
            # The conversation is free: the next turn, on the surviving process, works.
            await late.send(json.dumps({"type": "message.create", "conversation_id": conversation_id,
                                        "content": "go on [[sim:words=5]]"}))
            assert (await events_until(late, "message.completed", "error"))[-1]["type"] == "message.completed"

    streamed = state["content"] + _deltas(ended)
    assert _deltas(seen_by_a[:first + 1]) + _deltas(replayed) == streamed
    answer = await Message.objects.aget(pk=answer_id)
    assert (answer.status, answer.finish_reason, answer.content) == ("incomplete", "interrupted", streamed)
    records = [r async for r in UsageRecord.objects.filter(message_id=answer.pk)]
    assert len(records) == 1 and records[0].completion_tokens > 0
    assert (await Conversation.objects.aget(pk=conversation_id)).generation_id is None
    await adb(_nothing_held)()


# --- /v1: the official SDK's stream, its process killed ------------------------------------


async def _v1_stream_until_killed(port: int, api_key: str, model: str, process, *, chunks: int) -> str:
    """Stream a long answer with the official SDK; SIGKILL the process after `chunks` chunks
    (several liveness beats in) and read what still arrives. The text the client got."""
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key, max_retries=0, timeout=20)
    received, seen = [], 0
    stream = await client.chat.completions.create(
        model=model, stream=True, messages=[{"role": "user", "content": "story [[sim:words=400 tps=20]]"}]
    )
    with contextlib.suppress(openai.APIError, httpx2.HTTPError):
        async for chunk in stream:
            received += [choice.delta.content or "" for choice in chunk.choices]
            seen += 1
            if seen == chunks:
                assert await adb(_held_by_a_process)()  # what the process held carries its id
                process.kill()
    process.wait(10)
    await client.close()
    return "".join(received)


def _held_by_a_process() -> bool:
    return Reservation.objects.filter(status="held", process_id__isnull=False).exists()


@pytest.mark.parametrize("leased", [False, True], ids=["exact-reservation", "cap-leases"])
async def test_sigkill_mid_v1_stream_bills_what_streamed_once_and_releases_every_hold(
    tenant_factory, sim, settings, leased
):
    settings.GENERATION_STALE_SECONDS = STALE_SECONDS  # this process plays beat
    setup = await adb(tenant_capped)(tenant_factory)
    model = setup.assistant.model
    env = {**FAST_HEARTBEATS, "CAP_LEASE_SECONDS": "30" if leased else "0"}
    with web_processes(1, **env) as [(port, process)]:
        if leased:  # a call the lease booked before the process died
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=setup.api_key, max_retries=0)
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi [[sim:words=5]]"}])
            await client.close()
        received = await _v1_stream_until_killed(port, setup.api_key, model, process, chunks=40)

    assert await adb(_held_by_a_process)()  # the kill left them held…
    await asyncio.sleep(STALE_SECONDS + 0.5)
    assert await adb(processes_recover_stale)() == 1  # …for one sweep
    assert await adb(processes_recover_stale)() == 0

    [killed] = [r async for r in UsageRecord.objects.filter(outcome="interrupted")]
    assert 0 < killed.completion_tokens <= count_text(received, model)
    assert killed.call_id.startswith("cmpl-") and killed.estimated
    assert await UsageRecord.objects.acount() == (2 if leased else 1)
    if leased:
        assert killed.lease_ids and await Reservation.objects.filter(call_id__startswith="lease-").aexists()
    else:
        reservation = await Reservation.objects.aget(call_id=killed.call_id)
        assert (reservation.status, reservation.actual_usd) == ("settled", killed.cost_usd)
    spent = sum([r.cost_usd async for r in UsageRecord.objects.all()])
    assert (await CapPeriod.objects.aget()).spent_usd == spent
    await adb(_nothing_held)()
