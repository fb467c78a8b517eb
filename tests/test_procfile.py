"""The Procfile brings services mode up as README says: `honcho start -c web=2` starts two web
processes on PORT and PORT+1, a Celery worker and beat, against DATABASE_URL and REDIS_URL; an
interrupt stops all of them. Real processes on the test database and Redis: services mode only."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from tests.netutil import free_port
from tests.webprocs import ROOT, web_env

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not (settings.REDIS_URL and settings.SERVICES_MODE),
        reason="starts real web, worker and beat processes on PostgreSQL and Redis: services mode only",
    ),
]

HONCHO = Path(ROOT, ".venv", "bin", "honcho")


def _two_free_ports() -> int:
    """A port whose successor is free too (honcho numbers the web processes PORT, PORT+1)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def test_procfile_starts_services_mode_and_stops_it(tmp_path):
    port = _two_free_ports()
    env = web_env(BEAT_SCHEDULE=str(tmp_path / "beat-schedule"), LOG_LEVEL="info", WORKER_CONCURRENCY="1")
    honcho = subprocess.Popen(
        [str(HONCHO), "start", "-f", "Procfile", "-p", str(port), "-c", "web=2,worker=1,beat=1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in honcho.stdout], daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 60
        worker_ready = beat_started = False
        while time.monotonic() < deadline and not (
            worker_ready and beat_started and _healthy(port) and _healthy(port + 1)
        ):
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            seen.append(line)
            worker_ready |= " worker.1 " in line and "ready." in line
            beat_started |= " beat.1 " in line and "beat: Starting..." in line
        assert honcho.poll() is None, "".join(seen)
        assert worker_ready and beat_started, "".join(seen)
        assert _healthy(port) and _healthy(port + 1)
    finally:
        os.killpg(honcho.pid, signal.SIGINT)
        try:
            honcho.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
            raise
    # Every process of the group is gone: nothing is left listening or consuming.
    time.sleep(0.5)
    assert not _healthy(port) and not _healthy(port + 1)
    with pytest.raises(ProcessLookupError):
        os.killpg(honcho.pid, 0)
