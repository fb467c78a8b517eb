"""What Parley adds to a socket turn, over the simulator's own time: this code and a baseline, in one run.

    .venv/bin/python bench/turn_overhead.py --baseline /tmp/adm-base [--turns 120] [--concurrency 1,10]

(`git worktree add /tmp/adm-base 8471dbe` makes the baseline: the commit before one admission
path.) Starts the simulator (TTFT 100 ms, paced chunks) and two Daphne processes on the same
database and Redis — one serving this checkout, one serving the baseline's — creates a tenant
whose provider is the simulator, and opens sockets to each. Each socket sends turns into its
own conversation (`message.create` → `message.completed`), in blocks that alternate between the
simulator directly (the same streamed request over HTTP), the baseline and this code, so drift
hits all three alike. It prints the time to the first delta and to `message.completed` (p50,
p95), what each Parley adds over the simulator, and the ratio this / baseline of what they add.

Services mode when DATABASE_URL / REDIS_URL are set (PostgreSQL + Redis, as production runs;
SECRET_KEY and FIELD_ENCRYPTION_KEYS too); embedded otherwise (one SQLite file both share).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import websockets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PYTHON = sys.executable

from bench.proxy_overhead import MODEL, Sample, Series, serve_simulator  # noqa: E402
from tests.netutil import free_port, processes_stop, wait_listening  # noqa: E402

WORDS = 20


def _manage(*args: str, env: dict[str, str], cwd: Path = ROOT) -> str:
    done = subprocess.run([PYTHON, "manage.py", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def _content(n: int) -> str:
    return f"Benchmark turn {n} [[sim:words={WORDS}]]"


async def direct_turn(client: httpx.AsyncClient, url: str, n: int) -> Sample:
    """The simulator's own time for the same streamed call (no Parley in front)."""
    body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 512,
            "messages": [{"role": "user", "content": _content(n)}]}
    started = time.perf_counter()
    ttft = None
    async with client.stream("POST", url, json=body, headers={"Authorization": "Bearer sk-bench"}) as response:
        async for chunk in response.aiter_bytes():
            if ttft is None and b'"content"' in chunk:
                ttft = time.perf_counter() - started
    return Sample(ttft=ttft or float("nan"), total=time.perf_counter() - started)


@dataclass
class Socket:
    connection: object
    conversation_id: str | None = None


async def socket_turn(socket: Socket, n: int) -> Sample:
    frame = {"type": "message.create", "content": _content(n), "conversation_id": socket.conversation_id}
    started = time.perf_counter()
    await socket.connection.send(json.dumps(frame))
    ttft = None
    while True:
        event = json.loads(await asyncio.wait_for(socket.connection.recv(), timeout=30))
        kind = event["type"]
        if kind == "conversation":
            socket.conversation_id = event["id"]
        elif kind == "delta" and ttft is None:
            ttft = time.perf_counter() - started
        elif kind == "message.completed":
            return Sample(ttft=ttft or float("nan"), total=time.perf_counter() - started)
        elif kind == "error":
            raise RuntimeError(f"turn refused: {event}")


@dataclass
class Result:
    concurrency: int
    series: dict[str, Series] = field(default_factory=dict)


async def measure(*, sim_url: str, sockets: dict[str, list[Socket]], concurrency: int, turns: int,
                  blocks: int = 6) -> Result:
    result = Result(concurrency, {name: Series() for name in ("direct", *sockets)})
    per_block = max(1, turns // blocks // concurrency)
    counter = iter(range(10**9))
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def run(name: str, worker: int, series: Series) -> None:
            for _ in range(per_block):
                n = next(counter)
                try:
                    if name == "direct":
                        series.samples.append(await direct_turn(client, sim_url, n))
                    else:
                        series.samples.append(await socket_turn(sockets[name][worker], n))
                except Exception as error:  # noqa: BLE001 — counted and shown
                    series.errors += 1
                    if series.errors <= 3:
                        print(f"  {name}: {error}", file=sys.stderr)

        for name in ("direct", *sockets):  # warm every path: connections, caches, first queries
            await asyncio.gather(*(run(name, w, Series()) for w in range(concurrency)))
        for _ in range(blocks):
            for name in ("direct", *sockets):
                await asyncio.gather(*(run(name, w, result.series[name]) for w in range(concurrency)))
    return result


def report(results: list[Result], mode: str) -> None:
    print(f"\nA socket turn through Parley vs the simulator directly — {mode}; {WORDS}-chunk answers, "
          "TTFT 100 ms upstream (times in ms).\nadded = Parley's time minus the simulator's own; "
          "ratio = this code's added time / the baseline's.\n")
    header = (f"{'c':>3} {'n':>5} | {'metric':<10} | {'direct':>8} {'baseline':>9} {'this':>8} | "
              f"{'base+':>7} {'this+':>7} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        direct, base, this = r.series["direct"], r.series["baseline"], r.series["this"]
        for label, attribute, q in (("first p50", "ttft", 0.5), ("first p95", "ttft", 0.95),
                                     ("total p50", "total", 0.5), ("total p95", "total", 0.95)):
            d, b, t = (s.pct(attribute, q) for s in (direct, base, this))
            print(f"{r.concurrency:>3} {len(this.samples):>5} | {label:<10} | {d:>8.1f} {b:>9.1f} {t:>8.1f} | "
                  f"{b - d:>+7.1f} {t - d:>+7.1f} {(t - d) / (b - d):>6.2f}")
        errors = [s.errors for s in (direct, base, this)]
        if any(errors):
            print(f"    errors direct/baseline/this: {errors}")
        print("-" * len(header))


async def connect(port: int, token: str, count: int) -> list[Socket]:
    url = f"ws://127.0.0.1:{port}/ws/chat/?token={token}"
    return [Socket(await websockets.connect(url, additional_headers={"Origin": "http://127.0.0.1"}))
            for _ in range(count)]


async def bench(*, sim_url: str, ports: dict[str, int], tokens: list[str], concurrencies: list[int], turns: int) -> list[Result]:
    results = []
    for concurrency in concurrencies:
        print(f"c={concurrency} …", file=sys.stderr)
        sockets = {}
        for name, port in ports.items():  # one end user per worker: the per-user limit is theirs
            sockets[name] = [s for token in tokens[:concurrency] for s in await connect(port, token, 1)]
        try:
            results.append(await measure(sim_url=sim_url, sockets=sockets, concurrency=concurrency, turns=turns))
        finally:
            for group in sockets.values():
                for socket in group:
                    await socket.connection.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a checkout of the commit to compare with")
    parser.add_argument("--turns", type=int, default=120, help="measured turns per target and concurrency")
    parser.add_argument("--concurrency", default="1,10")
    parser.add_argument("--serve-simulator", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_simulator:
        return serve_simulator(args.serve_simulator, 200.0)

    env = {**os.environ, "LOG_LEVEL": "WARNING", "PROVIDER_ALLOW_PRIVATE_URLS": "true"}  # the simulator is on loopback
    services = bool(env.get("DATABASE_URL"))
    if services:
        env.setdefault("DEBUG", "false")
    else:
        env["SQLITE_PATH"] = str(Path(tempfile.mkdtemp()) / "turn_overhead.sqlite3")  # both processes share it
    mode = "services mode (PostgreSQL + Redis)" if services else "embedded mode (SQLite, in-memory layer)"
    _manage("migrate", "--noinput", env=env)
    concurrencies = [int(c) for c in args.concurrency.split(",")]

    processes: list[subprocess.Popen] = []
    try:
        sim_port = free_port()
        simulator = subprocess.Popen([PYTHON, __file__, "--baseline", "-", "--serve-simulator", str(sim_port)],
                                     cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        processes.append(simulator)
        wait_listening(sim_port, lambda: simulator.poll() is None, timeout=30)
        sim_base = f"http://127.0.0.1:{sim_port}/v1"
        slug = f"bench-{uuid.uuid4().hex[:8]}"
        _manage("create_tenant", slug, "--provider-base-url", sim_base, "--provider-key", "sk-bench",
                "--user-rpm", "1000000", "--tenant-rpm", "1000000", "--tenant-tpm", "2000000000",
                "--monthly-cap", "1000000", env=env)
        tokens = [json.loads(_manage("end_user_token", slug, f"bench-{n}", "--ttl", "3600", env=env))["token"]
                  for n in range(max(concurrencies))]
        ports = {"baseline": free_port(), "this": free_port()}
        for name, cwd in (("baseline", Path(args.baseline).resolve()), ("this", ROOT)):
            web = subprocess.Popen([PYTHON, "-m", "config.daphne", "-b", "127.0.0.1", "-p", str(ports[name]),
                                    "config.asgi:application"], cwd=cwd, env=env, stdout=subprocess.DEVNULL)
            processes.append(web)
            wait_listening(ports[name], lambda web=web: web.poll() is None, timeout=30)
        results = asyncio.run(bench(sim_url=f"{sim_base}/chat/completions", ports=ports, tokens=tokens,
                                    concurrencies=concurrencies, turns=args.turns))
        report(results, mode)
    finally:
        processes_stop(processes)


if __name__ == "__main__":
    main()
