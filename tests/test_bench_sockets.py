"""`bench/sockets.py` at a tiny size, as its README command runs it (its own web process, the
simulator, clients in a process of their own): every client completes with the stored answer,
and every answer is stored and billed. The bench is how the streaming goal is shown; a change
that breaks it (the provider egress guard once refused its loopback simulator, so every stream
ended in `upstream_error`) must fail here, not in the next session's measurement."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from django.conf import settings

pytestmark = pytest.mark.skipif(
    not (settings.SERVICES_MODE and settings.REDIS_URL),
    reason="services mode only: the bench measures one web process on PostgreSQL and Redis",
)

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| (\d+) \| (\d+) \| (\d+) \| (\d+) / (\d+) / (\d+) \| (\d+) / (\d+) \|.*\| (\d+) / (\d+) \|.*\| ([^|]+) \|$")


@pytest.fixture
def bench_database_url():
    """A database of its own: the bench migrates and fills it while the suite's is in use."""
    db = settings.DATABASES["default"]
    server = f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    name = f"parley_bench_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"{server}/{name}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_tiny_sockets_run_completes_every_stream_and_stores_and_bills_every_answer(bench_database_url):
    env = {**os.environ, "DATABASE_URL": bench_database_url}
    # As the README's command runs it: without what the suite's conftest sets for its own processes.
    for name in ("DJANGO_SETTINGS_MODULE", "PROVIDER_ALLOW_PRIVATE_URLS"):
        env.pop(name, None)
    run = subprocess.run(
        [sys.executable, "bench/sockets.py", "--n", "4", "--words", "20", "--tps", "100", "--client-procs", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=110,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [ROW.match(line) for line in run.stdout.splitlines() if line.startswith("| 4 |")]
    assert rows and all(rows), run.stdout
    n, complete, terminal, delivered, sent, stored_chars, frames, chunks, stored, billed, failures = rows[-1].groups()
    assert (int(complete), int(terminal), int(stored), int(billed)) == (4, 4, 4, 4), run.stdout
    assert int(delivered) == int(sent) == int(stored_chars) > 0 and int(chunks) == 4 * 20 >= int(frames) > 0
    assert failures.strip() == "none"
