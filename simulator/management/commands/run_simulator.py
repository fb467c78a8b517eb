"""``manage.py run_simulator``: serve the OpenAI-compatible simulator over HTTP until killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import uvicorn
from django.core.management.base import BaseCommand, CommandParser

from simulator import create_app


class Command(BaseCommand):
    help = "Serve the OpenAI-compatible upstream simulator over HTTP (prints one JSON line)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=9100, help="0 picks a free port")
        parser.add_argument("--ttft-ms", type=float, default=0.0)
        parser.add_argument("--tokens-per-second", type=float, default=0.0)
        parser.add_argument("--no-batches", action="store_true",
                            help="answer 404 on /v1/files and /v1/batches (a server without a Batch API)")
        parser.add_argument("--rate-limit-requests", type=int, default=0,
                            help="refuse calls with 429 past N per --rate-limit-window (0: never)")
        parser.add_argument("--rate-limit-window", type=float, default=60.0, help="seconds")

    def handle(self, *args: Any, **options: Any) -> None:
        app = create_app(ttft_ms=options["ttft_ms"], tokens_per_second=options["tokens_per_second"],
                         batches=not options["no_batches"])
        if options["rate_limit_requests"] > 0:
            app.rate_limit(requests=options["rate_limit_requests"], window_s=options["rate_limit_window"])
        config = uvicorn.Config(app, host=options["host"], port=options["port"], loop="asyncio",
                                log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        # uvicorn re-raises the Ctrl-C it handled; being stopped is how this command ends.
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(self._serve(uvicorn.Server(config), options))

    async def _serve(self, server: uvicorn.Server, options: dict[str, Any]) -> None:
        # Bound before serving so the printed port is the real one, even for --port 0.
        sock = server.config.bind_socket()
        host, port = sock.getsockname()[:2]
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                return await task  # startup failed: let its error surface
            await asyncio.sleep(0.01)
        shown = f"[{host}]" if ":" in host else host
        self.stdout.write(json.dumps({
            "simulator": f"http://{shown}:{port}/v1", "ttft_ms": options["ttft_ms"],
            "tokens_per_second": options["tokens_per_second"],
        }))
        self.stdout.flush()
        await task
