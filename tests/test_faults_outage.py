"""Outages longer than the retries, and connecting while a dependency is down.

Same private Redis and PostgreSQL as tests/test_faults.py, with a Parley of its own whose
outage budget is short (DEPENDENCY_RETRY_SECONDS 3 s instead of 30, EVENT_LOG_STALL_SECONDS
5 s instead of 35), so an outage "longer than the retries" takes seconds, not a minute: the
same code paths, scaled down. Each case checks, from outside and in the database: every client
got a terminal event or a clear refusal, the answer is stored and billed once, no hold stays
held, no conversation stays locked, and Parley works again without a restart.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
import websockets

from tests.test_faults import (
    PACED,
    SocketTurn,
    SseTurn,
    Stack,
    api,
    assert_no_hold,
    assert_turn_accounted,
    deltas,
    pytestmark,  # noqa: F401  (services mode only, for the same reason)
    running_stack,
    v1_call,
    v1_until_ok,
)

RETRY_SECONDS = 3.0  # DEPENDENCY_RETRY_SECONDS of this Parley
OUTAGE_SECONDS = 8.0  # longer than the retries (and than the stall bound, 5 s)
TRY_AGAIN_LATER = 4503  # the socket's close code for "a dependency is away; reconnect later"


@pytest.fixture(scope="module")
def stack(simulator_server) -> Iterator[Stack]:
    with running_stack(
        simulator_server, DEPENDENCY_RETRY_SECONDS=str(RETRY_SECONDS), EVENT_LOG_STALL_SECONDS="5",
    ) as running:
        yield running


def ws_url(stack: Stack) -> str:
    return f"ws://{stack.url[7:]}/ws/chat/?token={stack.token}"


async def v1_stream(client: httpx.AsyncClient, started: asyncio.Event) -> list[str]:
    """A streamed /v1 call read to its end: its `data:` lines."""
    lines: list[str] = []
    body = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 400,
            "messages": [{"role": "user", "content": f"a story {PACED}"}]}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                started.set()
    return lines


def v1_records(stack: Stack) -> list[tuple[Any, ...]]:
    return stack.sql("SELECT outcome, completion_tokens FROM billing_usagerecord WHERE call_id LIKE %s ORDER BY created_at", "cmpl-%")


async def refused_at_connect(stack: Stack) -> dict[str, Any]:
    """A socket opened while a dependency is down: an error frame with retry_after, then a
    close with 4503 — promptly, not a hang."""
    async with asyncio.timeout(15):
        async with websockets.connect(ws_url(stack)) as ws:
            frame = json.loads(await ws.recv())
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
    assert ws.close_code == TRY_AGAIN_LATER, (ws.close_code, ws.close_reason)
    assert frame["type"] == "error" and frame["code"] == "upstream_error" and frame["retry_after"] > 0, frame
    return frame


async def assert_v1_unavailable(client: httpx.AsyncClient) -> None:
    down = await v1_call(client)
    assert down.status_code == 503 and int(down.headers["retry-after"]) > 0, down.text
    assert down.json()["error"]["code"] == "service_unavailable"


async def a_turn_completes(stack: Stack) -> SocketTurn:
    """A new socket, a new conversation, one turn to message.completed."""
    socket = SocketTurn(stack)
    await socket.start("hello again [[sim:words=10]]")
    terminal = await socket.until("message.completed", "error", timeout=30)
    assert terminal["type"] == "message.completed", socket.events
    return socket


# --- the cases ----------------------------------------------------------------------------


async def test_redis_down_longer_than_the_retries_mid_stream(stack: Stack):
    """A socket turn, an SSE turn and a /v1 stream in flight while Redis stays down past every
    retry: the generations do not wait on it, each client ends with a terminal event, and
    each answer is stored and billed once."""
    socket = SocketTurn(stack)
    async with api(stack) as client:
        records_before = len(v1_records(stack))
        sse = SseTurn(stack, client)
        await socket.start(f"tell a story {PACED}")
        await sse.start(f"tell another {PACED}")
        v1_started = asyncio.Event()
        v1 = asyncio.create_task(v1_stream(client, v1_started))
        await socket.until("delta")
        await asyncio.wait_for(sse.first_delta.wait(), 15)
        await asyncio.wait_for(v1_started.wait(), 15)

        stack.redis.stop()
        down_at = time.monotonic()
        # The answers are stored while Redis is away: the generations do not stall on it.
        stored = "SELECT count(*) FROM conversations_message WHERE id = ANY(%s) AND status = 'complete'"
        while stack.sql(stored, [socket.message_id, sse.message_id]) != [(2,)]:
            assert time.monotonic() - down_at < OUTAGE_SECONDS, "an answer waited for Redis"
            await asyncio.sleep(0.2)
        stored_after = time.monotonic() - down_at
        # /v1 does not need Redis once admitted: it ends as usual, billed before [DONE].
        lines = await asyncio.wait_for(v1, 15)
        assert lines[-1] == "[DONE]" and "error" not in json.loads(lines[-2]), lines[-3:]
        await assert_v1_unavailable(client)
        await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        stack.redis.start()
        back_at = time.monotonic()

        # The socket gets the rest of the answer and its end once Redis is back.
        terminal = await socket.until("message.completed", "error", timeout=20)
        assert terminal["type"] == "message.completed", terminal
        completed_after = time.monotonic() - back_at
        # SSE ends too: with the answer, or (its log lost while no generation ran) an error.
        last = await sse.finished(timeout=20)
        assert last["type"] == "message.completed" or last["code"] == "upstream_error", last
        await v1_until_ok(client)

    try:
        assert_turn_accounted(stack, socket.conversation_id, socket.message_id, streamed=deltas(socket.events))
        assert_turn_accounted(stack, sse.conversation_id, sse.message_id, streamed=deltas(sse.events))
        assert [outcome for outcome, _ in v1_records(stack)[records_before:]][:1] == ["ok"]
        await _next_turn(socket)
        assert_no_hold(stack)
    finally:
        await socket.close()
    print(f"Redis down {OUTAGE_SECONDS:.0f}s: answers stored {stored_after:.1f}s into the outage; "
          f"the socket's message.completed {completed_after:.1f}s after Redis was back")


async def _next_turn(socket: SocketTurn) -> None:
    await socket.start("and then? [[sim:words=10]]", socket.conversation_id)
    assert (await socket.until("message.completed", "error"))["type"] == "message.completed", socket.events


@pytest.mark.parametrize("service", ["redis", "postgres"])
async def test_a_socket_opened_while_a_dependency_is_down(stack: Stack, service: str):
    """The handshake is answered at once (an error frame with retry_after, close 4503); /v1
    answers 503 meanwhile; once the dependency is back a new socket works."""
    dependency = getattr(stack, service)
    dependency.stop()
    try:
        async with api(stack) as client:
            await refused_at_connect(stack)
            await assert_v1_unavailable(client)
    finally:
        dependency.start()
    async with api(stack) as client:
        await v1_until_ok(client)
    socket = await a_turn_completes(stack)
    try:
        assert_turn_accounted(stack, socket.conversation_id, socket.message_id, streamed=deltas(socket.events))
        assert_no_hold(stack)
    finally:
        await socket.close()


async def test_conversation_join_while_postgres_is_down(stack: Stack):
    """A join while PostgreSQL is down is answered with an error frame (retry_after) and the
    socket stays open; the same join works once it is back."""
    socket = await a_turn_completes(stack)
    try:
        join = {"type": "conversation.join", "conversation_id": socket.conversation_id}
        stack.postgres.stop()
        try:
            await socket.ws.send(json.dumps(join))
            error = await socket.until("error", "conversation.state", timeout=15)
            assert error["type"] == "error" and error["code"] == "upstream_error" and error["retry_after"] > 0, error
        finally:
            stack.postgres.start()
        await socket.ws.send(json.dumps(join))
        state = await socket.until("conversation.state", "error", timeout=15)
        assert state["type"] == "conversation.state" and state["generating"] is False, state
        assert_turn_accounted(stack, socket.conversation_id, socket.message_id, streamed=deltas(socket.events))
        await _next_turn(socket)
        assert_no_hold(stack)
    finally:
        await socket.close()


async def test_a_v1_call_answered_while_postgres_stays_down_is_booked_once_it_is_back(stack: Stack):
    """A /v1 call admitted from the process's cache while PostgreSQL is down reaches the
    provider; its UsageRecord cannot be written. The caller gets a 503 after the retries,
    and the call is booked, once, when PostgreSQL is back: the provider was paid either way.
    Calls after it are refused at once, before the provider."""
    async with api(stack) as client:
        await v1_until_ok(client)  # the caller's configuration is cached: admission needs no database
        records_before = len(v1_records(stack))
        stack.postgres.stop()
        try:
            started = time.monotonic()
            answered = await v1_call(client)
            waited = time.monotonic() - started
            assert answered.status_code == 503 and int(answered.headers["retry-after"]) > 0, answered.text
            assert waited < RETRY_SECONDS + 5, waited  # the retries, not a hang
            # The process now knows PostgreSQL is away: the next call is refused before the
            # provider is paid for an answer that could not be booked.
            again_at = time.monotonic()
            again = await v1_call(client)
            assert again.status_code == 503 and int(again.headers["retry-after"]) > 0, again.text
            assert time.monotonic() - again_at < 2
            await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - started)))
        finally:
            stack.postgres.start()
        deadline = time.monotonic() + 20
        while len(v1_records(stack)) == records_before:
            assert time.monotonic() < deadline, "the call answered during the outage was never booked"
            await asyncio.sleep(0.3)
        await v1_until_ok(client)
        await asyncio.sleep(1)  # a second booking, were there one, has had time to land
    booked = v1_records(stack)[records_before:]
    # That call, then v1_until_ok's: the one refused at once never reached the provider.
    assert booked[0][0] == "ok" and booked[0][1] > 0 and len(booked) == 2, booked
    assert_no_hold(stack)
