"""Web processes for tests that need real ones (signals, kills, several processes): Daphne
through the project's launcher (`python -m config.daphne`), on the test database and Redis,
with settings of the test's own (small heartbeats, a short grace)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.db import connection

from tests.netutil import free_port, processes_stop, wait_listening

ROOT = Path(__file__).resolve().parent.parent


def web_env(**extra: str) -> dict[str, str]:
    db = connection.settings_dict
    return {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "SECRET_KEY": settings.SECRET_KEY,
        "FIELD_ENCRYPTION_KEYS": ",".join(settings.FIELD_ENCRYPTION_KEYS),
        "DEBUG": "false",
        "LOG_LEVEL": "WARNING",
        **extra,
    }


@contextmanager
def web_processes(count: int, **extra: str) -> Iterator[list[tuple[int, subprocess.Popen]]]:
    """`count` web processes, as (port, process); whatever still runs at the end is stopped."""
    env = web_env(**extra)
    ports = [free_port() for _ in range(count)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "config.daphne", "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        for port in ports
    ]
    try:
        for port, process in zip(ports, processes, strict=True):
            wait_listening(port, lambda process=process: process.poll() is None)
        yield list(zip(ports, processes, strict=True))
    finally:
        processes_stop([p for p in processes if p.poll() is None])


async def events_until(ws, *types: str, timeout: float = 20) -> list[dict]:
    """Frames from a `websockets` client up to and including the first of one of `types`."""
    events = []
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            events.append(event)
            if event["type"] in types:
                return events


def tenant_capped(tenant_factory):
    """A tenant with a monthly cap, so that every call holds and settles."""
    from billing.models import SpendingCap

    setup = tenant_factory()
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=100)
    return setup
