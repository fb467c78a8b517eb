"""ASGI plumbing for the simulator: bodies in, JSON and events out, disconnects watched."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


def dumps(payload: Any) -> bytes:
    """Compact JSON, as OpenAI writes it."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


async def send_json(send: Send, status: int, payload: Any, headers: Headers | None = None) -> None:
    body = dumps(payload)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


async def send_body(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            return await send({"type": "lifespan.shutdown.complete"})


async def read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def app_path(scope: Scope) -> str:
    """The path below the mount point: honours ``root_path`` when mounted inside another app."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


async def sleep_until(deadline: float) -> None:
    # Sleeping to absolute deadlines keeps the pace from drifting over a long reply.
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(work: Awaitable[None], receive: Receive) -> bool:
    """Run ``work``; cancel it if the client goes away. False when it was cut short that way.

    uvicorn silently drops sends after a disconnect, so without this a hung or paced reply
    would keep "streaming" to nobody. Exceptions of ``work`` (StreamCut) propagate.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # server shutdown: take the reply down with us
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    finished = task.done()
    if not finished:
        task.cancel()
    await asyncio.gather(task, watcher, return_exceptions=True)
    if finished:
        task.result()  # re-raise StreamCut and real bugs
    return finished
