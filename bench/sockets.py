"""N concurrent WebSocket answers against one web process, in services mode: does every event arrive?

    DATABASE_URL=postgres://…/parley_x REDIS_URL=redis://…/N SECRET_KEY=… FIELD_ENCRYPTION_KEYS=… \
        .venv/bin/python bench/sockets.py [--n 100,300,1000] [--words 300] [--tps 20] [--code DIR] \
        [--client-procs 2]

Starts the simulator (its own process, TTFT 100 ms, `--words` chunks paced at `--tps`) and one
web process (`python -m config.daphne`, from `--code`: another checkout measures another
version of Parley against the same database and Redis). For each N: N end users, each with its
own token, socket and new conversation, connect (at most `--handshakes` at a time); then all send one message at once and read
until a terminal event (`message.completed` or `error`) or a deadline. The clients run in
`--client-procs` processes of their own (the clients split among them), so that parsing 20,000
frames a second in one Python process is not what the bench measures.

It prints, per N: clients whose deltas joined equal the stored answer and that got
`message.completed` ("complete"), clients that got any terminal event, the text delivered
(characters of all deltas joined) vs the text stored, delta frames vs chunks the simulator sent
(a frame may carry several chunks: a reader that is behind gets consecutive deltas merged), the
delay from the simulator writing a chunk to the client receiving the frame that carries it
(p50/p99 over chunks: the simulator process stamps each content chunk with the wall clock and
its text, keyed by a marker in the prompt; a client's frames are matched in order to runs of
its chunks whose text joined equals the frame's, so a dropped delta is skipped, not paired with
the wrong chunk), the web process's RSS growth per open stream, and answers stored and billed
(assistant messages, UsageRecords).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PYTHON = sys.executable

from tests.netutil import free_port, processes_stop, wait_listening  # noqa: E402

MARKER = re.compile(rb"bench-([0-9a-f]{8})-(\d+)")


# --- the simulator, stamping each content chunk ---------------------------------------------


def serve_simulator(port: int) -> None:
    import django
    import uvicorn

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    django.setup()
    from simulator import create_app

    simulator = create_app(ttft_ms=100, tokens_per_second=0)
    stamps: dict[str, list[tuple[float, str]]] = {}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/stamps":
            body = json.dumps(stamps).encode()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": body})
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await simulator(scope, receive, send)
        messages, body = [], b""
        while True:
            message = await receive()
            messages.append(message)
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        found = MARKER.search(body)
        key = f"{found.group(1).decode()}-{found.group(2).decode()}" if found else None
        times = stamps.setdefault(key, []) if key else None
        pending = list(messages)

        async def replay() -> dict[str, Any]:
            return pending.pop(0) if pending else await receive()

        async def stamped_send(message: dict[str, Any]) -> None:
            await send(message)
            if times is not None and message["type"] == "http.response.body":
                now = time.time()
                for line in message.get("body", b"").splitlines():
                    if not line.startswith(b"data: {"):
                        continue
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    content = (choices[0].get("delta") or {}).get("content")
                    if content:
                        times.append((now, content))

        await simulator(scope, replay, stamped_send)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")


# --- the clients (in processes of their own) ----------------------------------------------------


@dataclass
class Client:
    index: int
    token: str
    conversation_id: str | None = None
    deltas: list[tuple[float, str]] = field(default_factory=list)
    terminal: dict[str, Any] | None = None
    failure: str = ""


async def run_client(client: Client, *, url: str, run: str, words: int, tps: float, go: asyncio.Event,
                     connected: list[int], deadline: float, handshakes: asyncio.Semaphore) -> None:
    import websockets

    try:
        await handshakes.acquire()  # released once open: a bounded number of handshakes at a time
        async with websockets.connect(f"{url}?token={client.token}", open_timeout=120, ping_interval=None,
                                      additional_headers={"Origin": "http://127.0.0.1"},
                                      max_queue=None) as ws:
            connected.append(client.index)
            handshakes.release()
            await go.wait()
            await ws.send(json.dumps({
                "type": "message.create",
                "content": f"bench-{run}-{client.index} [[sim:words={words} tps={tps}]]",
            }))
            async with asyncio.timeout(deadline - time.monotonic()):
                async for raw in ws:
                    now = time.time()
                    event = json.loads(raw)
                    kind = event.get("type")
                    if kind == "conversation":
                        client.conversation_id = event["id"]
                    elif kind == "delta":
                        client.deltas.append((now, event["content"]))
                    elif kind in ("message.completed", "error"):
                        client.terminal = event
                        return
    except TimeoutError:
        client.failure = "deadline"
    except Exception as error:  # noqa: BLE001 — counted and shown
        client.failure = f"{type(error).__name__}: {error}"[:120]
    finally:
        if client.index not in connected:
            handshakes.release()


async def serve_clients() -> None:
    """A client process: a job on stdin (one JSON line), `connected` on stdout once every
    socket is open (or failed), `go` on stdin to send, then the clients as one JSON line."""
    loop = asyncio.get_running_loop()
    job = json.loads(await loop.run_in_executor(None, sys.stdin.readline))
    clients = [Client(index, token) for index, token in job["tokens"]]
    go, connected = asyncio.Event(), []
    handshakes = asyncio.Semaphore(job["handshakes"])
    deadline = time.monotonic() + job["seconds"]
    tasks = [asyncio.create_task(run_client(c, url=job["url"], run=job["run"], words=job["words"], tps=job["tps"],
                                            go=go, connected=connected, deadline=deadline, handshakes=handshakes))
             for c in clients]
    while len(connected) + sum(t.done() for t in tasks) < len(clients) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    print(f"connected {len(connected)}", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    go.set()
    await asyncio.gather(*tasks)
    print(json.dumps([c.__dict__ for c in clients]), flush=True)


async def clients_run(tokens: list[str], *, procs: int, handshakes: int, rss: Any, **job: Any) -> tuple[list[Client], int, int, str]:
    """Run the clients in `procs` processes; returns them, the web process's RSS growth while
    they ran, how many connected, and the machine's load average (1 min) while they ran."""
    shares = [[(i, t) for i, t in enumerate(tokens) if i % procs == p] for p in range(procs)]
    children = [await asyncio.create_subprocess_exec(
        PYTHON, __file__, "--serve-clients", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        limit=1 << 30,
    ) for share in shares if share]
    for child, share in zip(children, shares, strict=False):
        child.stdin.write(json.dumps({**job, "tokens": share, "handshakes": max(1, handshakes // procs)}).encode() + b"\n")
        await child.stdin.drain()
    connected = 0
    for child in children:
        connected += int((await child.stdout.readline()).split()[1])
    idle = peak = rss()
    loads = [os.getloadavg()[0]]
    for child in children:  # all at once: the writes are tiny
        child.stdin.write(b"go\n")
    results = [asyncio.create_task(child.stdout.readline()) for child in children]
    while not all(r.done() for r in results):
        peak = max(peak, rss())
        loads.append(os.getloadavg()[0])
        await asyncio.wait(results, timeout=0.5)
    clients = sorted((Client(**c) for r in results for c in json.loads(r.result())), key=lambda c: c.index)
    for child in children:
        await child.wait()
    return clients, peak - idle, connected, f"{min(loads):.1f}–{max(loads):.1f}"


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


@dataclass
class Outcome:
    n: int
    complete: int
    terminal: int
    frames: int
    sent: int
    chars_delivered: int
    chars_sent: int
    chars_stored: int
    stored_chars_match: int
    p50_ms: float
    p99_ms: float
    rss_kb_per_stream: float
    stored: int
    billed: int
    failures: dict[str, int]
    seconds: float
    load: str


async def measure(n: int, *, url: str, sim_url: str, pid: int, setup: Any, words: int, tps: float,
                  procs: int, handshakes: int) -> Outcome:
    import httpx2 as httpx
    from asgiref.sync import sync_to_async

    run = uuid.uuid4().hex[:8]
    tokens = await sync_to_async(lambda: [setup.token(f"bench-{run}-{i}") for i in range(n)])()
    started = time.monotonic()
    clients, rss_growth, connected, load = await clients_run(
        tokens, procs=procs, handshakes=handshakes, rss=lambda: rss_kb(pid), url=url, run=run, words=words, tps=tps,
        seconds=120 + words / tps + n * 0.05,
    )
    seconds = time.monotonic() - started
    await asyncio.sleep(2)  # let the last answers be stored
    async with httpx.AsyncClient() as http:
        stamps = (await http.get(f"{sim_url}/stamps", timeout=30)).json()
    stored = await sync_to_async(_stored)([c.conversation_id for c in clients if c.conversation_id])
    return _outcome(n, clients, stamps, stored, run=run, rss=rss_growth / max(1, connected), seconds=seconds,
                    load=load)


def _stored(conversation_ids: list[str]) -> dict[str, Any]:
    from billing.models import UsageRecord
    from conversations.models import Message

    answers = dict(Message.objects.filter(conversation_id__in=conversation_ids, role="assistant")
                   .values_list("conversation_id", "content"))
    billed = UsageRecord.objects.filter(conversation_id__in=conversation_ids).count()
    return {"answers": {str(k): v for k, v in answers.items()}, "billed": billed}


def _run_of(sent: list[list[Any]], start: int, content: str) -> int | None:
    """The end (exclusive) of the chunks from `start` whose text joined is `content`, if any."""
    joined, end = "", start
    while end < len(sent) and len(joined) < len(content) and content.startswith(joined + sent[end][1]):
        joined += sent[end][1]
        end += 1
    return end if joined == content and end > start else None


def _delays(deltas: list[tuple[float, str]], sent: list[list[Any]]) -> list[float]:
    """Per chunk, the delay to the frame that carried it: each frame is matched to the next run
    of chunks whose text joined equals it (chunks skipped on the way were never delivered)."""
    delays, position = [], 0
    for received, content in deltas:
        start = position
        while start < len(sent) and (end := _run_of(sent, start, content)) is None:
            start += 1
        if start == len(sent):
            break
        delays += [(received - stamp) * 1000 for stamp, _ in sent[start:end]]
        position = end
    return delays


def _outcome(n: int, clients: list[Client], stamps: dict[str, list[list[Any]]], stored: dict[str, Any], *, run: str,
             rss: float, seconds: float, load: str) -> Outcome:
    delays: list[float] = []
    complete = match = 0
    failures: dict[str, int] = {}
    for client in clients:
        delays += _delays(client.deltas, stamps.get(f"{run}-{client.index}", []))
        answer = stored["answers"].get(client.conversation_id or "")
        same = answer is not None and "".join(c for _, c in client.deltas) == answer
        match += same
        complete += same and bool(client.terminal) and client.terminal.get("type") == "message.completed"
        reason = client.failure or (client.terminal or {}).get("code") or ("" if client.terminal else "no terminal")
        if reason:
            failures[reason] = failures.get(reason, 0) + 1
    return Outcome(
        n=n, complete=complete, terminal=sum(1 for c in clients if c.terminal),
        frames=sum(len(c.deltas) for c in clients),
        sent=sum(len(stamps.get(f"{run}-{c.index}", [])) for c in clients),
        chars_delivered=sum(len(content) for c in clients for _, content in c.deltas),
        chars_sent=sum(len(text) for c in clients for _, text in stamps.get(f"{run}-{c.index}", [])),
        chars_stored=sum(len(answer) for answer in stored["answers"].values()),
        stored_chars_match=match, p50_ms=pct(delays, 0.5), p99_ms=pct(delays, 0.99),
        rss_kb_per_stream=rss, stored=len(stored["answers"]), billed=stored["billed"],
        failures=failures, seconds=seconds, load=load,
    )


# --- orchestration -----------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {**os.environ, "DEBUG": "false", "LOG_LEVEL": "ERROR", "PROVIDER_ALLOW_PRIVATE_URLS": "true"}  # the simulator is on loopback
    for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "FIELD_ENCRYPTION_KEYS"):
        if not env.get(name):
            raise SystemExit(f"{name} must be set: this benchmark runs in services mode")
    return env


def _tenant(sim_base_url: str) -> Any:
    from tests.factories import make_tenant

    setup = make_tenant(base_url=sim_base_url, slug=f"bench-sockets-{uuid.uuid4().hex[:6]}")
    tenant = setup.tenant
    tenant.end_user_rpm = tenant.tenant_rpm = 1_000_000
    tenant.tenant_tpm = 1_000_000_000
    tenant.save()
    setup.assistant.max_tokens = 2000
    setup.assistant.save()
    return setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="100,300,1000", help="concurrent streams, comma-separated")
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--tps", type=float, default=20.0)
    parser.add_argument("--code", default=str(ROOT), help="the checkout whose web process is measured")
    parser.add_argument("--label", default="")
    parser.add_argument("--client-procs", type=int, default=2, help="processes the clients run in")
    parser.add_argument("--handshakes", type=int, default=100,
                        help="socket handshakes at a time, all processes together (Daphne refuses one not "
                             "accepted within 5 s: on a loaded machine fewer at a time open more)")
    parser.add_argument("--serve-simulator", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-clients", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_simulator:
        return serve_simulator(args.serve_simulator)
    if args.serve_clients:
        return asyncio.run(serve_clients())
    env = _env()
    subprocess.run([PYTHON, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    sim_port, web_port = free_port(), free_port()
    processes = [subprocess.Popen([PYTHON, __file__, "--serve-simulator", str(sim_port)], cwd=ROOT, env=env)]
    profile = ["-m", "cProfile", "-o", os.environ["BENCH_WEB_PROFILE"]] if os.environ.get("BENCH_WEB_PROFILE") else []
    web = subprocess.Popen([PYTHON, *profile, "-m", "config.daphne", "-b", "127.0.0.1", "-p", str(web_port),
                            "config.asgi:application"], cwd=args.code, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    processes.append(web)
    try:
        wait_listening(sim_port, lambda: processes[0].poll() is None, timeout=90)
        wait_listening(web_port, lambda: web.poll() is None, timeout=90)
        setup = _tenant(f"http://127.0.0.1:{sim_port}/v1")
        options = {"url": f"ws://127.0.0.1:{web_port}/ws/chat/", "sim_url": f"http://127.0.0.1:{sim_port}",
                   "pid": web.pid, "setup": setup, "tps": args.tps, "procs": args.client_procs,
                   "handshakes": args.handshakes}
        asyncio.run(measure(5, words=20, **options))  # warm-up: imports, connections, caches
        outcomes = []
        for n in (int(v) for v in args.n.split(",")):
            outcomes.append(asyncio.run(measure(n, words=args.words, **options)))
            report(outcomes[-1:], label=f"{args.label or args.code} (so far)", words=args.words, tps=args.tps,
                   procs=args.client_procs)
    finally:
        processes_stop(processes)
    report(outcomes, label=args.label or args.code, words=args.words, tps=args.tps, procs=args.client_procs)


def report(outcomes: list[Outcome], *, label: str, words: int, tps: float, procs: int) -> None:
    print(f"\n{label}: one web process, services mode; {words} chunks at {tps:g}/s per stream, TTFT 100 ms; "
          f"clients in {procs} process(es)\n")
    print("| N | complete (deltas joined = stored, completed) | any terminal "
          "| text delivered / sent upstream / stored (chars) "
          "| delta frames / upstream chunks | delay p50 / p99 ms | RSS per stream | answers stored / billed "
          "| wall s | load average | failures |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        failures = ", ".join(f"{k}: {v}" for k, v in sorted(o.failures.items())) or "none"
        print(f"| {o.n} | {o.complete} | {o.terminal} "
              f"| {o.chars_delivered} / {o.chars_sent} / {o.chars_stored} "
              f"| {o.frames} / {o.sent} | {o.p50_ms:.0f} / {o.p99_ms:.0f} | {o.rss_kb_per_stream:.0f} KB "
              f"| {o.stored} / {o.billed} | {o.seconds:.0f} | {o.load} | {failures} |")


if __name__ == "__main__":
    main()
