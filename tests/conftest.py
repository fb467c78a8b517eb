"""Shared fixtures: the simulator over real HTTP, tenants, WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from config.asgi import application
from simulator import create_app
from tests.factories import TenantSetup, make_tenant
from tests.simserver import SimulatorServer

# The simulator listens on 127.0.0.1: provider credentials may point at loopback in this suite,
# in services mode too (DEBUG off), and in every process it starts (they inherit this).
os.environ["PROVIDER_ALLOW_PRIVATE_URLS"] = "true"

# The live-server fixtures (`parley`, `parley_server`) for every module that asks for them.
pytest_plugins = ["tests.liveserver"]


@pytest.fixture(scope="session")
def simulator_server() -> SimulatorServer:
    server = SimulatorServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def plain_server() -> SimulatorServer:
    """A provider without a Batch API (like vLLM or Ollama): 404 on /v1/files and /v1/batches."""
    server = SimulatorServer(create_app(batches=False))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def sim(simulator_server: SimulatorServer):
    """The simulator app, reset for this test (faults, stats, recorded requests)."""
    simulator_server.app.reset()
    yield simulator_server.app
    simulator_server.app.reset()


@pytest.fixture(autouse=True)
def _fast_upstream(settings) -> None:
    settings.PROVIDER_ALLOW_PRIVATE_URLS = True
    settings.UPSTREAM_FIRST_TOKEN_TIMEOUT = 2.0
    settings.UPSTREAM_READ_TIMEOUT = 2.0
    settings.UPSTREAM_RETRY_BASE_DELAY = 0.01
    settings.UPSTREAM_RETRY_MAX_DELAY = 0.05
    settings.PROVIDER_PACING_MAX_WAIT = 3.0


def _clear_of_a_minute_boundary(margin: float = 5.0) -> None:
    """The sliding-window counter (`limits`, in memory: windows aligned to the clock) weighs the
    previous minute by the part of it still in the window and admits while that weighted count is
    below the limit by less than one call, so the first call after a minute boundary may be admitted
    past a limit (2 calls at 0:59.9 weigh 1.99 < 2 at 1:00.1). A test that counts to its limit
    starts clear of a boundary."""
    into = time.time() % 60
    if into > 60 - margin:
        time.sleep(60 - into + 0.05)


@pytest.fixture
def tenant_factory(simulator_server: SimulatorServer, db):
    from billing.defaults import install_default_prices
    from billing.models import ModelPrice
    from moderation.defaults import install_moderation_price

    def make(**options: Any) -> TenantSetup:
        # Transactional tests flush the rows the price migrations made: put them back.
        install_default_prices(ModelPrice)
        install_moderation_price(ModelPrice)
        if any(name.endswith(("_rpm", "_tpm")) for name in options):
            _clear_of_a_minute_boundary()
        return make_tenant(base_url=simulator_server.base_url, **options)

    return make


class ChatSocket:
    """A WebsocketCommunicator speaking the chat protocol, with helpers to read one turn."""

    def __init__(self, communicator: WebsocketCommunicator) -> None:
        self.communicator = communicator

    async def send(self, frame: dict[str, Any]) -> None:
        await self.communicator.send_json_to(frame)

    async def send_text(self, text: str) -> None:
        await self.communicator.send_to(text_data=text)

    async def receive(self, timeout: float = 5) -> dict[str, Any]:
        return await self.communicator.receive_json_from(timeout=timeout)

    async def receive_until(self, *types: str, timeout: float = 10) -> list[dict[str, Any]]:
        """Every event up to and including the first whose type is in `types`."""
        events: list[dict[str, Any]] = []
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            event = await self.receive(timeout=max(remaining, 0.01))
            events.append(event)
            if event["type"] in types:
                return events

    async def turn(self, content: str, **fields: Any) -> list[dict[str, Any]]:
        await self.send({"type": "message.create", "content": content, **fields})
        return await self.receive_until("message.completed", "error")

    async def nothing_more(self, timeout: float = 0.2) -> bool:
        return await self.communicator.receive_nothing(timeout=timeout)


@asynccontextmanager
async def chat_socket(token: str | None, *, headers: list | None = None, path: str | None = None) -> AsyncIterator[ChatSocket]:
    url = path or (f"/ws/chat/?token={token}" if token else "/ws/chat/")
    communicator = WebsocketCommunicator(
        application, url, headers=headers or [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1")]
    )
    connected, _ = await communicator.connect()
    assert connected
    try:
        yield ChatSocket(communicator)
    finally:
        await communicator.disconnect()


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    """Rate-limit counters live in Redis or process memory, outside the test database."""
    from billing.caps import known_periods_clear
    from billing.leases import leases_forget
    from compat.v1_liveness import liveness_forget
    from conversations.admission import admission_caches_clear
    from llm.pacing import windows_forget
    from tenants.ratelimits import rate_limits_reset

    rate_limits_reset()
    admission_caches_clear()
    known_periods_clear()
    leases_forget()
    liveness_forget()
    windows_forget()


@pytest.fixture(autouse=True)
def _async_orm_connections_closed():
    """Django's async ORM methods (`aget`, `aexists`…) from an async test run on asgiref's one
    sync thread and leave its connection open, which keeps the test database from being
    dropped at the end of the session: close it after each test."""
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@pytest.fixture(autouse=True)
def _fresh_channel_layer():
    """channels_redis binds its locks to the event loop that first used them; every test has
    its own loop, so every test gets its own layer instance."""
    from channels.layers import channel_layers

    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.fixture
async def chat():
    yield chat_socket
    # Generations are detached from sockets: let this test's finish before its loop closes.
    from conversations.engine import _running

    if _running:
        done, pending = await asyncio.wait(list(_running), timeout=10)
        for task in pending:
            task.cancel()


async def wait_for(predicate, *, timeout: float = 5.0, interval: float = 0.02):
    """Poll an async predicate until it is truthy (for work finishing in a detached task)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


def adb(fn):
    """Run a sync ORM function from an async test."""
    return database_sync_to_async(fn)


def dumps(value: Any) -> str:
    return json.dumps(value)
