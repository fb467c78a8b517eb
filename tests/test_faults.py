"""Dependencies that come and go: Redis and PostgreSQL restarted under a live Parley.

Parley (Daphne, services mode) runs against PRIVATE Redis and PostgreSQL instances started
here (never the shared ones: their lifetimes belong to everyone), with the simulator as the
model. Each case restarts one of them mid-stream or between turns and then checks, from the
outside and in the database: every client got a terminal event, the answer is stored and
billed exactly once, no hold stays held, the conversation is free, and the next turn (and the
next /v1 call) works without restarting Parley; /v1 answers 503 with Retry-After meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import psycopg
import pytest
import websockets
from django.conf import settings

from billing.leases import LEASE_CALL_PREFIX
from tests.netutil import free_port, wait_listening

pytestmark = pytest.mark.skipif(
    not (settings.SERVICES_MODE and settings.REDIS_URL),
    reason="services mode only: embedded mode has no PostgreSQL or Redis to restart "
    "(this suite starts private instances of both, so it needs their binaries, as CI has)",
)

ROOT = Path(__file__).resolve().parent.parent
PACED = "[[sim:words=120 tps=40]]"  # ~3 s of deltas: long enough to restart something mid-stream


# --- private services ---------------------------------------------------------------------


class PrivateRedis:
    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.workdir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port, lambda: self.process is not None and self.process.poll() is None)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


class PrivatePostgres:
    """initdb + pg_ctl in a temp dir, trust auth, run as the `postgres` OS user when we are
    root (PostgreSQL refuses to run as root)."""

    def __init__(self, workdir: str) -> None:
        self.port = free_port()
        self.data = os.path.join(workdir, "pgdata")
        self.workdir = workdir
        self.bin = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        if os.geteuid() == 0:
            shutil.chown(workdir, "postgres")

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/parley"

    def _run(self, *args: str) -> None:
        command = [os.path.join(self.bin, args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def init(self) -> None:
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()
        with psycopg.connect(f"postgres://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE parley")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", self.data, "-o", options, "-l", os.path.join(self.workdir, "pg.log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")


@dataclass
class Stack:
    redis: PrivateRedis
    postgres: PrivatePostgres
    url: str  # Parley
    api_key: str
    token: str
    log: str

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.postgres.url) as conn:
            return conn.execute(query, params).fetchall()


SETUP = """
import json, django
django.setup()
from io import StringIO
from django.core.management import call_command
call_command("migrate", "--noinput", verbosity=0)
out = StringIO()
call_command("create_tenant", "faults", "--provider-base-url", "{sim}", "--provider-key", "sk-sim",
             "--monthly-cap", "100", "--user-rpm", "1000", stdout=out)
tenant = json.loads(out.getvalue())
out = StringIO()
call_command("end_user_token", "faults", "alice", "--ttl", "3600", stdout=out)
print(json.dumps({{"api_key": tenant["api_key"], "token": json.loads(out.getvalue())["token"]}}))
"""


@contextmanager
def running_stack(simulator_server, **settings_env: str) -> Iterator[Stack]:
    """Private Redis and PostgreSQL, and a Parley on them with `settings_env` added to its
    environment (shorter outage timeouts, for one)."""
    workdir = tempfile.mkdtemp(prefix="parley-faults-")
    redis, postgres = PrivateRedis(workdir), PrivatePostgres(workdir)
    redis.start()
    postgres.init()
    env = {
        **os.environ,
        "DATABASE_URL": postgres.url, "REDIS_URL": redis.url,
        "SECRET_KEY": settings.SECRET_KEY, "FIELD_ENCRYPTION_KEYS": ",".join(settings.FIELD_ENCRYPTION_KEYS),
        "DEBUG": "false", "LOG_LEVEL": "WARNING", "DJANGO_SETTINGS_MODULE": "config.settings",
        **settings_env,
    }
    made = subprocess.run(
        [sys.executable, "-c", SETUP.format(sim=simulator_server.base_url)],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    )
    secrets = json.loads(made.stdout.strip().splitlines()[-1])
    port, log = free_port(), os.path.join(workdir, "parley.log")
    with open(log, "wb") as log_file:
        parley = subprocess.Popen(
            [sys.executable, "-m", "config.daphne", "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"],
            cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(port, lambda: parley.poll() is None)
        yield Stack(redis, postgres, f"http://127.0.0.1:{port}", secrets["api_key"], secrets["token"], log)
    finally:
        parley.terminate()
        try:
            parley.wait(15)
        except subprocess.TimeoutExpired:
            parley.kill()
        if redis.process is not None and redis.process.poll() is None:
            redis.stop()
        with contextlib.suppress(subprocess.CalledProcessError):  # a test may leave it stopped
            postgres.stop()
        # Parley's log outlives the run, for a failure's post-mortem.
        shutil.copy(log, os.path.join(tempfile.gettempdir(), "parley-faults.log"))
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(simulator_server) -> Iterator[Stack]:
    with running_stack(simulator_server) as running:
        yield running


# --- clients ------------------------------------------------------------------------------


class SocketTurn:
    """One socket turn, read to its terminal event."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.events: list[dict[str, Any]] = []
        self.ws: Any = None

    async def start(self, content: str, conversation_id: str | None = None) -> None:
        if self.events:
            assert self.conversation_id
        if self.ws is None:
            self.ws = await websockets.connect(f"ws://{self.stack.url[7:]}/ws/chat/?token={self.stack.token}")
        self.events = []
        await self.ws.send(json.dumps({"type": "message.create", "conversation_id": conversation_id, "content": content}))

    async def until(self, *types: str, timeout: float = 45) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                event = json.loads(await self.ws.recv())
                self.events.append(event)
                if event["type"] in types:
                    return event

    @property
    def conversation_id(self) -> str:
        if not hasattr(self, "_conversation_id"):  # kept: the next turn's events replace these
            self._conversation_id = next(e["id"] for e in self.events if e["type"] == "conversation")
        return self._conversation_id

    @property
    def message_id(self) -> str:
        return next(e["message_id"] for e in self.events if e["type"] == "message.started")

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


class SseTurn:
    """One REST turn with `stream: true`, read to `[DONE]`."""

    def __init__(self, stack: Stack, client: httpx.AsyncClient) -> None:
        self.stack, self.client = stack, client
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.first_delta = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self, content: str) -> None:
        created = await self.client.post("/api/v1/conversations/", json={"end_user": "bob"})
        assert created.status_code == 201, created.text
        self.conversation_id = created.json()["id"]
        self.task = asyncio.create_task(self._read(content))

    async def _read(self, content: str) -> None:
        path = f"/api/v1/conversations/{self.conversation_id}/messages/"
        async with self.client.stream("POST", path, json={"content": content, "stream": True}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    self.events.append(event)
                    if event["type"] == "delta":
                        self.first_delta.set()

    async def finished(self, timeout: float = 45) -> dict[str, Any]:
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout)
        assert self.done
        return self.events[-1]

    @property
    def message_id(self) -> str:
        return next(e["message_id"] for e in self.events if e["type"] == "message.started")


async def v1_call(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi [[sim:words=5]]"}], "max_tokens": 50,
    }, timeout=30)


async def answered_unavailable(client: httpx.AsyncClient, socket: SocketTurn, *, v1: bool = True) -> None:
    """While a dependency is down: /v1 (when `v1`) and REST answer 503 with Retry-After, a
    socket frame gets an error frame (read later, with the stream's events)."""
    if v1:
        down = await v1_call(client)
        assert down.status_code == 503 and int(down.headers["retry-after"]) > 0
        assert down.json()["error"]["code"] == "service_unavailable"
    rest = await client.post(f"/api/v1/conversations/{socket.conversation_id}/messages/", json={"content": "x"})
    assert rest.status_code == 503 and int(rest.headers["retry-after"]) > 0, rest.text
    await socket.ws.send(json.dumps({"type": "message.create", "conversation_id": socket.conversation_id, "content": "x"}))


async def v1_until_ok(client: httpx.AsyncClient, timeout: float = 20) -> float:
    """Seconds until /v1 answers 200 again (each 503 must carry Retry-After)."""
    started = time.monotonic()
    while True:
        response = await v1_call(client)
        if response.status_code == 200:
            return time.monotonic() - started
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] and response.json()["error"]["code"] == "service_unavailable"
        assert time.monotonic() - started < timeout
        await asyncio.sleep(0.2)


def api(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=60)


# --- the checks afterwards ----------------------------------------------------------------


def assert_turn_accounted(stack: Stack, conversation_id: str, message_id: str, *, streamed: str) -> None:
    """Stored once (complete, holding what streamed), billed exactly once, conversation free."""
    deadline = time.monotonic() + 10
    while stack.sql("SELECT generation_id FROM conversations_conversation WHERE id = %s", conversation_id)[0][0]:
        assert time.monotonic() < deadline, "the conversation stayed locked"
        time.sleep(0.1)
    (status, content), = stack.sql("SELECT status, content FROM conversations_message WHERE id = %s", message_id)
    assert status == "complete"
    assert content.startswith(streamed[:20]) and len(content) >= len(streamed)
    billed = stack.sql("SELECT count(*), sum(completion_tokens) FROM billing_usagerecord WHERE message_id = %s", message_id)
    assert billed[0][0] == 1 and billed[0][1] > 0


def assert_no_hold(stack: Stack) -> None:
    """No call's hold stays held (a /v1 cap lease is held on purpose, for its few seconds)."""
    held = "SELECT count(*) FROM billing_reservation WHERE status = 'held' AND call_id NOT LIKE %s"
    assert stack.sql(held, f"{LEASE_CALL_PREFIX}%") == [(0,)]


def deltas(events: list[dict[str, Any]]) -> str:
    return "".join(e["content"] for e in events if e["type"] == "delta")


# --- the cases ----------------------------------------------------------------------------


async def _streams_through(stack: Stack, outage) -> tuple[SocketTurn, SseTurn]:
    """A socket turn and an SSE turn streaming while `outage` runs; both read to the end."""
    socket = SocketTurn(stack)
    async with api(stack) as client:
        sse = SseTurn(stack, client)
        await socket.start(f"tell a story {PACED}")
        await sse.start(f"tell another {PACED}")
        await socket.until("delta")
        await asyncio.wait_for(sse.first_delta.wait(), 15)
        await outage(client, socket)
        await socket.until("message.completed")
        errors = [e for e in socket.events if e["type"] == "error"]
        # The frame sent during the outage was answered with an error; the socket stayed open.
        assert [(e["code"], e["retry_after"] > 0) for e in errors] == [("upstream_error", True)], errors
        assert (await sse.finished())["type"] == "message.completed"
    return socket, sse


async def _next_turn_works(stack: Stack, socket: SocketTurn) -> None:
    await socket.start("and then? [[sim:words=10]]", socket.conversation_id)
    assert (await socket.until("message.completed", "error"))["type"] == "message.completed"


@pytest.mark.parametrize("service", ["redis", "postgres"])
async def test_a_dependency_restarted_mid_stream(stack: Stack, service: str):
    measured: dict[str, float] = {}
    dependency = getattr(stack, service)

    async def restart(client: httpx.AsyncClient, socket: SocketTurn) -> None:
        records_before = len(stack.sql("SELECT id FROM billing_usagerecord WHERE call_id LIKE %s", "cmpl-%"))
        dependency.stop()
        # A /v1 call that needs the dependency to be admitted (Redis: its rate limits) is
        # refused at once; one admitted from the process's cache (PostgreSQL is needed only to
        # book it) waits for its booking and answers once PostgreSQL is back (a 503 only
        # past DEPENDENCY_RETRY_SECONDS): it runs alongside, so the outage stays short.
        during = asyncio.create_task(v1_call(client))
        await answered_unavailable(client, socket, v1=service == "redis")
        # Still down until the frame is answered: on a loaded machine its handling can
        # otherwise outlast the outage, and then there is no outage left to report.
        await socket.until("error", timeout=30)
        await asyncio.sleep(1)
        dependency.start()
        measured["v1_recovered_s"] = await v1_until_ok(client)
        answered = await during
        if answered.status_code == 200:  # admitted before the outage showed: booked once it was over
            assert service == "postgres", answered.text
            booked = stack.sql("SELECT id FROM billing_usagerecord WHERE call_id LIKE %s", "cmpl-%")
            assert len(booked) == records_before + 2  # this call and v1_until_ok's
        else:
            assert answered.status_code == 503 and int(answered.headers["retry-after"]) > 0, answered.text

    socket, sse = await _streams_through(stack, restart)
    try:
        assert_turn_accounted(stack, socket.conversation_id, socket.message_id, streamed=deltas(socket.events))
        assert_turn_accounted(stack, sse.conversation_id, sse.message_id, streamed=deltas(sse.events))
        await _next_turn_works(stack, socket)
        assert_no_hold(stack)
    finally:
        await socket.close()
    print(f"{service} restart: /v1 back to 200 {measured['v1_recovered_s']:.2f}s after it was")


async def test_postgres_restarted_between_turns(stack: Stack):
    socket = SocketTurn(stack)
    try:
        async with api(stack) as client:
            assert (await v1_call(client)).status_code == 200  # the endpoint's threads hold connections
            await socket.start("first [[sim:words=10]]")
            assert (await socket.until("message.completed", "error"))["type"] == "message.completed"

            stack.postgres.stop()
            stack.postgres.start()
            # The first call after the restart succeeds: stale connections are replaced, not used.
            first = await v1_call(client)
            assert first.status_code == 200, first.text
            await _next_turn_works(stack, socket)
            rest = await client.post(
                f"/api/v1/conversations/{socket.conversation_id}/messages/",
                json={"content": "once more [[sim:words=10]]", "stream": False},
            )
            assert rest.status_code == 201, rest.text
        assert_turn_accounted(stack, socket.conversation_id, socket.message_id, streamed=deltas(socket.events))
        assert_no_hold(stack)
    finally:
        await socket.close()
