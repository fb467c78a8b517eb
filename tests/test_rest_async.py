"""The REST message post is async end to end: a reply being generated holds no thread."""

from __future__ import annotations

import asyncio
import sys

import pytest
from django.test import AsyncClient

from tests.conftest import adb

pytestmark = pytest.mark.django_db(transaction=True)

POSTS = 8
TTFT_SECONDS = 1.5


def _threads_in_the_view() -> list[str]:
    """Threads whose stack is inside the REST views module right now (a sync view waiting
    for its reply would be one, for the whole generation)."""
    return [
        str(thread_id)
        for thread_id, frame in sys._current_frames().items()
        if any("conversations/api" in f.f_code.co_filename or "conversations/rest/" in f.f_code.co_filename
               for f in _stack(frame))
    ]


def _stack(frame):
    while frame is not None:
        yield frame
        frame = frame.f_back


async def test_concurrent_non_streaming_posts_hold_no_thread_while_their_replies_generate(tenant_factory, sim):
    setup = await adb(tenant_factory)()
    client, auth = AsyncClient(), {"Authorization": f"Bearer {setup.api_key}"}
    conversations = []
    for index in range(POSTS):
        created = await client.post("/api/v1/conversations/", {"end_user": f"u{index}"}, content_type="application/json", headers=auth)
        assert created.status_code == 201, created.content
        conversations.append(created.json()["id"])
    sim.ttft_ms = TTFT_SECONDS * 1000
    try:
        posts = [
            asyncio.create_task(client.post(
                f"/api/v1/conversations/{conversation_id}/messages/", {"content": f"hello {n}", "stream": False},
                content_type="application/json", headers=auth,
            ))
            for n, conversation_id in enumerate(conversations)
        ]
        # Every reply is now waiting for its first token.
        await asyncio.sleep(TTFT_SECONDS / 2)
        assert _threads_in_the_view() == []
        # A sync view parks a thread per post (the process's one thread for thread-sensitive
        # work, here): the posts would run one after another (POSTS * TTFT_SECONDS at least),
        # or not at all. Concurrent, they take about one TTFT.
        replies = await asyncio.wait_for(asyncio.gather(*posts), timeout=POSTS * TTFT_SECONDS)
    finally:
        sim.ttft_ms = 0
    for reply in replies:
        assert reply.status_code == 201, reply.content
        body = reply.json()
        assert body["role"] == "assistant" and body["status"] == "complete" and body["content"]
        assert {"id", "seq", "role", "content", "status", "tokens", "model", "created_at"} <= set(body)
        assert reply.headers.get("x-ratelimit-limit-requests") is not None
