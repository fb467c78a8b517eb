"""`/v1` calls through the endpoint's ASGI handler in the test's own process and loop, for tests
that patch the endpoint's internals (a live server in another thread would not see them)."""

from __future__ import annotations

import asyncio


async def closing_hop(fn, /, **kwargs):
    """In place of the endpoint's `db`/`db_after`: its own threads would keep a connection open."""
    from channels.db import database_sync_to_async

    return await database_sync_to_async(fn)(**kwargs)


async def v1_handle(api_key: str, raw: bytes) -> list[dict]:
    """One request through the handler; every ASGI message it sent."""
    from compat import openai_api

    incoming = [{"type": "http.request", "body": raw, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        if incoming:
            return incoming.pop()
        await asyncio.sleep(3600)  # the client stays connected

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "headers": [(b"authorization", f"Bearer {api_key}".encode())]}
    await asyncio.wait_for(openai_api.handle(openai_api.Request(scope, receive, send)), timeout=10)
    return sent
