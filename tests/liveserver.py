"""Parley itself on a loopback port, for tests that drive it with real HTTP clients (the SDK).

Services mode (PostgreSQL + Redis): Daphne in a subprocess, on the test database — the server
production runs. Embedded mode: the test database and channel layer live in this process, so
uvicorn serves `config.asgi.application` from a background thread instead (as the simulator
does). Either way the server is started once per session; use the `parley` fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from django.conf import settings
from django.db import connection

from tests.netutil import free_port, wait_listening

ROOT = Path(__file__).resolve().parent.parent

# What the suite's `_fast_upstream` fixture sets, for a server process that cannot see it.
FAST_UPSTREAM_ENV = {
    "UPSTREAM_FIRST_TOKEN_TIMEOUT": "2",
    "UPSTREAM_READ_TIMEOUT": "2",
    "UPSTREAM_RETRY_BASE_DELAY": "0.01",
    "UPSTREAM_RETRY_MAX_DELAY": "0.05",
    "PROVIDER_PACING_MAX_WAIT": "3",
}


class ThreadServer:
    """uvicorn in a daemon thread, serving the project's ASGI app."""

    in_process = True

    def __init__(self) -> None:
        from config.asgi import application

        self.port = free_port()
        config = uvicorn.Config(
            application, host="127.0.0.1", port=self.port, loop="asyncio", log_level="warning",
            log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="parley-live", daemon=True)

    def start(self) -> None:
        self.thread.start()
        wait_listening(self.port, self.thread.is_alive)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


class DaphneServer:
    """Daphne in a subprocess, on this session's test database and Redis (or, embedded, the
    test database's SQLite file); `env` adds to or overrides its environment."""

    in_process = False

    def __init__(self, **env: str) -> None:
        db = connection.settings_dict
        self.port = free_port()
        self.env = {
            **os.environ,
            "SECRET_KEY": settings.SECRET_KEY,
            "FIELD_ENCRYPTION_KEYS": ",".join(settings.FIELD_ENCRYPTION_KEYS),
            "DEBUG": "false",
            "LOG_LEVEL": "WARNING",
            **FAST_UPSTREAM_ENV,
            **env,
        }
        if connection.vendor == "sqlite":  # embedded: the test database's file, in-memory layers
            self.env.pop("DATABASE_URL", None)
            self.env.pop("REDIS_URL", None)
            self.env["SQLITE_PATH"] = db["NAME"]
        else:
            host, port = db["HOST"] or "127.0.0.1", db["PORT"] or 5432
            self.env["DATABASE_URL"] = f"postgres://{db['USER']}@{host}:{port}/{db['NAME']}"
            self.env["REDIS_URL"] = settings.REDIS_URL
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "config.daphne", "-b", "127.0.0.1", "-p", str(self.port), "config.asgi:application"],
            cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port, lambda: self.process is not None and self.process.poll() is None)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


class Parley:
    def __init__(self, server: ThreadServer | DaphneServer) -> None:
        self.server = server
        self.url = f"http://127.0.0.1:{server.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def in_process(self) -> bool:
        return self.server.in_process

    def settle(self, timeout: float = 10) -> None:
        """Wait for work the server finishes after answering (detached generations, usage
        writes), so that the test's database flush does not race it. In-process only; a
        subprocess's work is awaited by the tests reading to the end of their streams."""
        if not self.in_process:
            return
        from compat.calls import _settling
        from conversations.engine import _running

        deadline = time.monotonic() + timeout
        while any(not task.done() for task in [*_running, *_settling]) and time.monotonic() < deadline:
            time.sleep(0.02)


@pytest.fixture(scope="session")
def parley_server(django_db_setup, django_db_blocker) -> Iterator[Parley]:
    server = DaphneServer() if settings.SERVICES_MODE and settings.REDIS_URL else ThreadServer()
    server.start()
    try:
        yield Parley(server)
    finally:
        server.stop()


@pytest.fixture
def parley(parley_server: Parley) -> Iterator[Parley]:
    """The live server; the test must also use a transactional database (its data is read
    by other threads or processes)."""
    yield parley_server
    parley_server.settle()
