"""GET /healthz: database, cache and channel layer, each reported; 200 only when all answer."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse

CHECK_TIMEOUT = 3.0


def _database() -> None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()


async def _cache() -> None:
    key = f"healthz:{uuid.uuid4().hex}"
    await cache.aset(key, "ok", timeout=10)
    if await cache.aget(key) != "ok":
        raise RuntimeError("cache did not return the value just written")
    await cache.adelete(key)


async def _channel_layer() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.send(channel, {"type": "healthz.ping"})
    message = await layer.receive(channel)
    if message.get("type") != "healthz.ping":
        raise RuntimeError("channel layer returned another message")


async def _run(check: Callable[[], Awaitable[None]]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except Exception as error:  # noqa: BLE001 — a health check reports, it does not raise
        return {"ok": False, "error": type(error).__name__, "ms": round((time.monotonic() - started) * 1000, 1)}
    return {"ok": True, "ms": round((time.monotonic() - started) * 1000, 1)}


async def healthz(request: HttpRequest) -> JsonResponse:
    names = ("database", "cache", "channel_layer")
    results = await asyncio.gather(
        _run(sync_to_async(_database, thread_sensitive=False)), _run(_cache), _run(_channel_layer)
    )
    checks = dict(zip(names, results, strict=True))
    healthy = all(result["ok"] for result in results)
    return JsonResponse({"status": "ok" if healthy else "unavailable", "checks": checks}, status=200 if healthy else 503)
