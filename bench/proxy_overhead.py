"""What Parley's OpenAI-compatible endpoint adds to a streamed completion, measured end to end.

    .venv/bin/python bench/proxy_overhead.py [--requests 200] [--concurrency 1,10,50] [--baseline DIR]

Starts the simulator (`manage.py run_simulator`, TTFT 100 ms, paced chunks) and one Daphne
process serving Parley, creates a tenant whose provider is the simulator, then sends the same
streamed requests (20 content chunks, `include_usage`) straight to the simulator and through
`POST /v1/chat/completions`, alternating blocks, at each concurrency. A third target, a Daphne
app that only relays the bytes (`bench/bare_relay.py`), measured in the same run, is the floor
any Python proxy under Daphne pays here. It prints the time to first token and the total time
(p50, p95) of each, what each adds, and the serving process's CPU time per request (utime +
stime from /proc, over its own blocks). The tenant has a monthly cap (so every call is reserved
and settled), rate limits (counted, set high enough not to refuse) and accounting.

`--baseline DIR` (a checkout of another commit, e.g. `git worktree add /tmp/base COMMIT`) serves
the same `/v1` from that code too, on the same database and Redis, in the same alternating
blocks, and prints this checkout against it as a ratio: a regression shows in one run.

Every server runs with TCP_NODELAY, as OpenAI's and any tuned server do, and as Parley's own
`python -m config.daphne` (what `make run` starts) does: stock Daphne (Twisted) and a uvicorn
given a `socket.socket()` leave Nagle's algorithm on, and each small SSE write after the first
then waits for the client's delayed ACK (up to 40 ms on Linux). `--stock-daphne` measures Daphne
as the plain `daphne …` command starts it, to show that effect.

Services mode when DATABASE_URL / REDIS_URL are set (PostgreSQL + Redis, as in production;
SECRET_KEY and FIELD_ENCRYPTION_KEYS must be set too); the embedded defaults otherwise. The
database is migrated first. Accounting is on: every proxied request writes its UsageRecord.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the helper servers import the project
PYTHON = sys.executable

from tests.netutil import free_port, processes_stop, wait_listening  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MODEL = "gpt-4o-mini"
WORDS = 20


def _manage(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [PYTHON, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"manage.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def serve_simulator(port: int, tokens_per_second: float) -> None:
    """The simulator on a TCP_NODELAY socket (accepted sockets inherit it on Linux)."""
    import django
    import uvicorn

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    django.setup()
    from simulator import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    app = create_app(ttft_ms=100, tokens_per_second=tokens_per_second)
    config = uvicorn.Config(app, loop="asyncio", log_level="warning", lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])


def serve_daphne(port: int, application: str = "config.asgi:application") -> None:
    """Daphne with TCP_NODELAY on every accepted connection, as `python -m config.daphne` runs it."""
    from daphne.cli import CommandLineInterface

    from config.daphne import nodelay_install

    nodelay_install()
    sys.argv = ["daphne", "-b", "127.0.0.1", "-p", str(port), application]
    CommandLineInterface.entrypoint()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


@dataclass
class Sample:
    ttft: float
    total: float


@dataclass
class Series:
    samples: list[Sample] = field(default_factory=list)
    errors: int = 0

    def pct(self, attribute: str, q: float) -> float:
        values = sorted(getattr(s, attribute) for s in self.samples)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] * 1000


async def one_stream(client: httpx2.AsyncClient, url: str, key: str, n: int) -> Sample:
    body = {
        "model": MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": f"Benchmark request {n} [[sim:words={WORDS}]]"}],
    }
    started = time.perf_counter()
    ttft = None
    async with client.stream("POST", url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
        tail = b""
        async for chunk in response.aiter_bytes():
            if ttft is None and b'"content"' in chunk:
                ttft = time.perf_counter() - started
            tail = (tail + chunk)[-64:]
        if b"[DONE]" not in tail:
            raise RuntimeError("stream ended without [DONE]")
    return Sample(ttft=ttft if ttft is not None else float("nan"), total=time.perf_counter() - started)


async def run_block(url: str, key: str, *, count: int, concurrency: int, series: Series) -> None:
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(timeout=60, limits=limits) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(count):
            queue.put_nowait(n)

        async def worker() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                try:
                    series.samples.append(await one_stream(client, url, key, n))
                except Exception as error:  # noqa: BLE001 — counted and shown
                    series.errors += 1
                    if series.errors <= 3:
                        print(f"  error: {error}", file=sys.stderr)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


@dataclass
class Result:
    concurrency: int
    direct: Series
    bare: Series
    proxied: Series
    bare_cpu_ms: float
    cpu_ms: float
    baseline: Series | None = None  # the same endpoint served by the baseline checkout
    baseline_cpu_ms: float = 0.0


@dataclass(frozen=True)
class Target:
    url: str
    key: str
    pid: int | None = None  # the serving process, whose CPU is counted


async def measure(*, direct: Target, bare: Target, parley: Target, concurrency: int, requests: int,
                  blocks: int = 4, baseline: Target | None = None) -> Result:
    """Blocks of direct, bare-relay, baseline and Parley requests in turn, so drift hits all alike."""
    targets = {"direct": direct, "bare": bare, "parley": parley}
    if baseline is not None:
        targets = {"direct": direct, "bare": bare, "baseline": baseline, "parley": parley}
    series = {name: Series() for name in targets}
    cpu = dict.fromkeys(targets, 0.0)
    # Warm every path (connections, first queries, tokenizer, caches) before measuring.
    for target in targets.values():
        await run_block(target.url, target.key, count=concurrency * 2, concurrency=concurrency, series=Series())
    per_block = max(concurrency, requests // blocks)
    for _ in range(blocks):
        for name, target in targets.items():
            before = cpu_seconds(target.pid) if target.pid else 0.0
            await run_block(target.url, target.key, count=per_block, concurrency=concurrency, series=series[name])
            if target.pid:
                cpu[name] += cpu_seconds(target.pid) - before
    def cpu_ms(name: str) -> float:
        return cpu[name] * 1000 / max(1, len(series[name].samples))

    return Result(
        concurrency, series["direct"], series["bare"], series["parley"],
        bare_cpu_ms=cpu_ms("bare"), cpu_ms=cpu_ms("parley"),
        baseline=series.get("baseline"), baseline_cpu_ms=cpu_ms("baseline") if baseline else 0.0,
    )


def report(results: list[Result], mode: str) -> None:
    print(f"\nParley /v1/chat/completions vs the simulator directly — {mode}; "
          f"{WORDS}-chunk streams, TTFT 100 ms upstream (times in ms).\n"
          "bare = a Daphne ASGI app that only relays the bytes (bench/bare_relay.py): the floor.\n")
    header = (f"{'c':>3} {'n':>5} | {'metric':<11} | {'direct':>8} {'bare':>8} {'parley':>8} | "
              f"{'bare+':>7} {'parley+':>7} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        for label, attribute, q in (("TTFT p50", "ttft", 0.5), ("TTFT p95", "ttft", 0.95),
                                     ("total p50", "total", 0.5), ("total p95", "total", 0.95)):
            d, b, p = (s.pct(attribute, q) for s in (r.direct, r.bare, r.proxied))
            print(f"{r.concurrency:>3} {len(r.proxied.samples):>5} | {label:<11} | {d:>8.1f} {b:>8.1f} {p:>8.1f} | "
                  f"{b - d:>+7.1f} {p - d:>+7.1f} {p / d:>6.3f}")
        errors = [s.errors for s in (r.direct, r.bare, r.proxied)]
        error_note = f"; errors direct/bare/parley {errors}" if any(errors) else ""
        print(f"{r.concurrency:>3} {'':>5} | {'CPU/req':<11} | {'':>8} {r.bare_cpu_ms:>8.2f} {r.cpu_ms:>8.2f} | "
              f"ms of the serving process{error_note}")
        print("-" * len(header))
    if any(r.baseline is not None for r in results):
        _report_baseline(results)


def _report_baseline(results: list[Result]) -> None:
    """The same endpoint served by the baseline checkout, measured in the same blocks."""
    print("\nthis checkout vs the baseline, same run: ratio = this / baseline (times in ms).\n")
    header = (f"{'c':>3} | {'metric':<11} | {'baseline':>8} {'this':>8} | {'base+':>7} {'this+':>7} | {'ratio':>6}")
    print(header)
    print("-" * len(header))
    for r in results:
        assert r.baseline is not None
        for label, attribute, q in (("TTFT p50", "ttft", 0.5), ("TTFT p95", "ttft", 0.95),
                                     ("total p50", "total", 0.5), ("total p95", "total", 0.95)):
            d, b, p = (s.pct(attribute, q) for s in (r.direct, r.baseline, r.proxied))
            print(f"{r.concurrency:>3} | {label:<11} | {b:>8.1f} {p:>8.1f} | {b - d:>+7.1f} {p - d:>+7.1f} | {p / b:>6.3f}")
        print(f"{r.concurrency:>3} | {'CPU/req':<11} | {r.baseline_cpu_ms:>8.2f} {r.cpu_ms:>8.2f} | {'':>7} {'':>7} | "
              f"{r.cpu_ms / r.baseline_cpu_ms if r.baseline_cpu_ms else float('nan'):>6.3f}")
        print("-" * len(header))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="proxied requests per concurrency (same direct)")
    parser.add_argument("--concurrency", default="1,10,50")
    parser.add_argument("--tokens-per-second", type=float, default=200.0, help="upstream chunk pacing")
    parser.add_argument("--stock-daphne", action="store_true", help="Daphne without TCP_NODELAY")
    parser.add_argument("--baseline", help="a checkout of another commit: its /v1 measured in the same run")
    parser.add_argument("--serve-simulator", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-daphne", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_simulator:
        return serve_simulator(args.serve_simulator, args.tokens_per_second)
    if args.serve_daphne:
        return serve_daphne(args.serve_daphne)
    if args.serve_bare:
        return serve_daphne(args.serve_bare, "bench.bare_relay:app")

    env = {**os.environ, "LOG_LEVEL": "WARNING", "PROVIDER_ALLOW_PRIVATE_URLS": "true"}  # the simulator is on loopback
    services = bool(env.get("DATABASE_URL"))
    if services:
        env.setdefault("DEBUG", "false")
    mode = "services mode (PostgreSQL + Redis)" if services else "embedded mode (SQLite, in-memory layer)"
    _manage("migrate", "--noinput", env=env)

    processes: list[subprocess.Popen] = []
    try:
        sim_port = free_port()
        simulator = subprocess.Popen(
            [PYTHON, __file__, "--serve-simulator", str(sim_port), "--tokens-per-second", str(args.tokens_per_second)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        )
        processes.append(simulator)
        wait_listening(sim_port, lambda: simulator.poll() is None, timeout=30)
        sim_base = f"http://127.0.0.1:{sim_port}/v1"

        tenant = json.loads(_manage(
            "create_tenant", f"bench-{uuid.uuid4().hex[:8]}", "--provider-base-url", sim_base,
            "--provider-key", "sk-bench", "--user-rpm", "1000000", "--tenant-rpm", "1000000",
            "--tenant-tpm", "2000000000", "--monthly-cap", "1000000", env=env,
        ))
        web_port, bare_port = free_port(), free_port()
        command = (
            [PYTHON, "-m", "daphne", "-b", "127.0.0.1", "-p", str(web_port), "config.asgi:application"]
            if args.stock_daphne else [PYTHON, __file__, "--serve-daphne", str(web_port)]
        )
        daphne = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        processes.append(daphne)
        bare = subprocess.Popen(
            [PYTHON, __file__, "--serve-bare", str(bare_port)], cwd=ROOT, stdout=subprocess.DEVNULL,
            env={**env, "BARE_RELAY_UPSTREAM": f"{sim_base}/chat/completions"},
        )
        processes.append(bare)
        wait_listening(web_port, lambda: daphne.poll() is None, timeout=30)
        wait_listening(bare_port, lambda: bare.poll() is None, timeout=30)
        baseline = None
        if args.baseline:  # the same database and Redis, the baseline's code
            base_port = free_port()
            old = subprocess.Popen(
                [PYTHON, "-m", "config.daphne", "-b", "127.0.0.1", "-p", str(base_port), "config.asgi:application"],
                cwd=Path(args.baseline).resolve(), env=env, stdout=subprocess.DEVNULL,
            )
            processes.append(old)
            wait_listening(base_port, lambda: old.poll() is None, timeout=30)
            baseline = Target(f"http://127.0.0.1:{base_port}/v1/chat/completions", tenant["api_key"], old.pid)

        results = []
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            print(f"c={concurrency} …", file=sys.stderr)
            results.append(asyncio.run(measure(
                direct=Target(f"{sim_base}/chat/completions", "sk-bench"),
                bare=Target(f"http://127.0.0.1:{bare_port}/", "sk-bench", bare.pid),
                parley=Target(f"http://127.0.0.1:{web_port}/v1/chat/completions", tenant["api_key"], daphne.pid),
                concurrency=concurrency, requests=args.requests, baseline=baseline,
            )))
        report(results, mode + (", stock Daphne (Nagle on)" if args.stock_daphne else ", Daphne with TCP_NODELAY"))
    finally:
        processes_stop(processes)


if __name__ == "__main__":
    main()
