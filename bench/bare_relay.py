"""The floor for `bench/proxy_overhead.py`: an ASGI app that only relays bytes.

It forwards each POST body to `BARE_RELAY_UPSTREAM` (the simulator's chat completions URL)
with the same HTTP client Parley's relay uses, and streams the upstream's bytes back as they
arrive: no authentication, limits, caps or accounting. What it adds over calling the simulator
directly is what the server (Daphne), ASGI and one pooled upstream hop cost on this machine;
what Parley adds beyond it is Parley's own work.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import httpx2

logging.getLogger("httpx2").setLevel(logging.WARNING)

UPSTREAM = os.environ.get("BARE_RELAY_UPSTREAM", "")
_client: httpx2.AsyncClient | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _client
    if scope["type"] == "lifespan":
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        return
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if _client is None:
        _client = httpx2.AsyncClient(timeout=60, limits=httpx2.Limits(max_connections=None, max_keepalive_connections=100))
    headers = {"content-type": "application/json"}
    for name, value in scope["headers"]:
        if name == b"authorization":
            headers["authorization"] = value.decode("latin-1")
    request = _client.build_request("POST", UPSTREAM, content=body, headers=headers)
    response = await _client.send(request, stream=True)
    try:
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})
        async for chunk in response.aiter_bytes():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    finally:
        await response.aclose()
