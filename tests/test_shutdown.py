"""SIGTERM drains a web process: new turns are refused (socket error, REST and /v1 503 with
Retry-After), running answers finish within SHUTDOWN_GRACE_SECONDS, what still runs after it
is stored and billed as interrupted, every hold is given back, and the process exits.

Real Daphne processes through the project's launcher: they open the test database, so this
runs in services mode (CI's second run) only."""

from __future__ import annotations

import asyncio
import json
import signal
from decimal import Decimal

import httpx2 as httpx
import pytest
import websockets
from django.conf import settings
from django.core.management import call_command

from billing.models import CapPeriod, Reservation, UsageRecord
from conversations import services
from conversations.models import Conversation, Message
from streaming import eventlog
from tests.conftest import adb
from tests.webprocs import events_until, tenant_capped, web_processes

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not (settings.REDIS_URL and settings.SERVICES_MODE),
        reason="starts real web processes, which need PostgreSQL and Redis shared with the test",
    ),
]




async def _exited(process, timeout: float) -> int:
    # The exit itself (Daphne's teardown, the lease release, the interpreter's atexit) is
    # seconds on a quiet machine; the bound is generous for a CI machine running two suites.
    async with asyncio.timeout(timeout):
        while process.poll() is None:
            await asyncio.sleep(0.05)
    return process.returncode


def _nothing_held() -> None:
    assert not Reservation.objects.filter(status="held").exists()
    assert all(p.reserved_usd == 0 for p in CapPeriod.objects.all())
    call_command("reconcile_caps")  # exits 1 (SystemExit) on any drift between counters and ledger


async def _draining(port: int, timeout: float = 15) -> None:
    """Wait until the process has taken the signal (it refuses turns), however loaded the
    machine is, rather than for a fixed time. Probed with a /v1 call that could never run:
    no key, no body (400 or 401 while the process takes turns, 503 once it drains)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client, asyncio.timeout(timeout):
        while (await client.post("/v1/chat/completions", content=b"")).status_code != 503:
            await asyncio.sleep(0.05)


async def test_sigterm_refuses_new_turns_and_lets_the_running_answer_finish(tenant_factory, sim):
    setup = await adb(tenant_capped)(tenant_factory)
    token = await adb(setup.token)()
    with web_processes(1, SHUTDOWN_GRACE_SECONDS="30") as [(port, process)]:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/chat/?token={token}") as ws:
            # ~8 s of answer: the refusals below must be seen while it still runs (the process
            # exits once it ends), with room for a machine busy enough to slow each step.
            await ws.send(json.dumps({"type": "message.create", "content": "story [[sim:words=160 tps=20]]"}))
            started = await events_until(ws, "delta")
            process.send_signal(signal.SIGTERM)
            await _draining(port)
            # New turns go elsewhere: on a socket, an error with retry_after ...
            await ws.send(json.dumps({"type": "message.create", "content": "another", "client_msg_id": "m2"}))
            rest = await events_until(ws, "error")
            assert "message.completed" not in [e["type"] for e in rest], "the answer ended before the checks"
            assert (rest[-1]["code"], rest[-1]["client_msg_id"]) == ("rate_limited", "m2")
            assert rest[-1]["retry_after"] >= 1
            # ... on REST and /v1 a 503 with Retry-After.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
                auth = {"Authorization": f"Bearer {setup.api_key}"}
                conversation_id = started[0]["id"]
                posted = await client.post(f"/api/v1/conversations/{conversation_id}/messages/",
                                           json={"content": "hi"}, headers=auth)
                v1 = await client.post("/v1/chat/completions", headers=auth,
                                       json={"model": setup.assistant.model, "messages": [{"role": "user", "content": "hi"}]})
            assert (posted.status_code, posted.headers["retry-after"]) == (503, "1")
            assert (v1.status_code, v1.headers["retry-after"]) == (503, "1")
            assert v1.json()["error"]["code"] == "service_unavailable"
            rest += await events_until(ws, "message.completed")
        # The running answer finished, complete, and the process exited without waiting out the grace.
        assert rest[-1]["finish_reason"] == "stop"
        assert await _exited(process, timeout=25) == 0
    answer = await Message.objects.aget(pk=rest[-1]["message_id"])
    streamed = "".join(e["content"] for e in started + rest if e["type"] == "delta")
    assert (answer.status, answer.content) == ("complete", streamed)
    assert (await Conversation.objects.aget(pk=conversation_id)).generation_id is None
    await adb(_nothing_held)()


async def test_sigterm_past_the_grace_stores_and_bills_what_streamed(tenant_factory, sim):
    setup = await adb(tenant_capped)(tenant_factory)
    token = await adb(setup.token)()
    with web_processes(1, SHUTDOWN_GRACE_SECONDS="0.5") as [(port, process)]:
        async with (
            websockets.connect(f"ws://127.0.0.1:{port}/ws/chat/?token={token}") as ws,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client,
        ):
            await ws.send(json.dumps({"type": "message.create", "content": "story [[sim:words=400 tps=20]]"}))
            started = await events_until(ws, "delta")
            async with client.stream(
                "POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {setup.api_key}"},
                json={"model": setup.assistant.model, "stream": True,
                      "messages": [{"role": "user", "content": "story [[sim:words=400 tps=20]]"}]},
            ) as response:
                lines = response.aiter_lines()
                first = [await anext(lines) for _ in range(6)]
                process.send_signal(signal.SIGTERM)
                relayed = first + [line async for line in lines]
        assert await _exited(process, timeout=25) == 0

    # The socket's generation: what streamed is stored incomplete, billed once, the log ends it.
    conversation = await Conversation.objects.aget(pk=started[0]["id"])
    assert conversation.generation_id is None
    answer = await Message.objects.filter(conversation=conversation, role="assistant").aget()
    assert (answer.status, answer.finish_reason) == ("incomplete", "interrupted")
    assert 0 < len(answer.content) and "".join(e["content"] for e in started if e["type"] == "delta") in answer.content
    record = await UsageRecord.objects.aget(conversation_id=conversation.pk)
    assert record.completion_tokens > 0 and record.cost_usd > Decimal(0)
    key = eventlog.log_key(services.group_name(tenant_id=setup.tenant.pk, conversation_id=conversation.pk))
    _, last = (await eventlog.read_all(eventlog.event_log(), key))[-1]
    assert (last["type"], last["finish_reason"]) == ("message.completed", "interrupted")

    # The /v1 stream: ended with OpenAI's in-stream error, not a bare cut; billed for what streamed.
    data = [line for line in relayed if line.startswith("data: ")]
    assert json.loads(data[-1][6:])["error"]["code"] == "service_unavailable"
    v1 = await UsageRecord.objects.filter(call_id__startswith="cmpl-").aget()
    assert v1.completion_tokens > 0 and v1.completion_tokens < 400
    await adb(_nothing_held)()
