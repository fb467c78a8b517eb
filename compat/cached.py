"""The response cache on `/v1` (responsecache/requests.py): an opted-in key's repeated request is
answered with the stored completion — its own id, no upstream call, a $0 `cached` ledger row —
streamed or not; a complete answer to a miss is kept. `X-Parley-Cache: hit|miss` says which."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from llm.gateway import Usage
from responsecache.chat import answer_pieces
from responsecache.requests import request_find, request_keep
from responsecache.store import Hit, hit_book

from .completions import CompletionPlan
from .db import db, db_after
from .errors import Reply

logger = logging.getLogger(__name__)

HIT = (b"x-parley-cache", b"hit")
MISS = (b"x-parley-cache", b"miss")
SSE_CONTENT_TYPE = b"text/event-stream; charset=utf-8"
Headers = tuple[tuple[bytes, bytes], ...]


async def cached_reply(plan: CompletionPlan, *, headers: Callable[[], Headers]) -> Reply | None:
    """The stored completion for this request, or None (a miss: call the model). A hit books
    its ledger row; the caller gives the call's unused hold back (`call_in_flight`)."""
    if plan.cache_key is None:
        return None
    hit = await db(request_find, tenant_id=plan.tenant_id, key=plan.cache_key)
    if hit is None:
        return None
    await asyncio.shield(db_after(
        hit_book, subject=plan.hold.subject, call_id=f"cached-{uuid.uuid4()}", model=plan.model, price=plan.price,
        prompt_tokens=plan.prompt_tokens, hit=hit,
    ))
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    sent = (*(header for header in headers() if header != MISS), HIT)
    if plan.stream:
        events = _chunks(hit, completion_id, created, with_usage=plan.forward_usage)
        body = b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events) + b"data: [DONE]\n\n"
        return Reply(200, body, content_type=SSE_CONTENT_TYPE, headers=sent)
    return Reply.json(_completion(hit, completion_id, created), headers=sent)


def _usage(hit: Hit) -> dict[str, Any]:
    return {"prompt_tokens": hit.prompt_tokens, "completion_tokens": hit.completion_tokens,
            "total_tokens": hit.prompt_tokens + hit.completion_tokens}


def _completion(hit: Hit, completion_id: str, created: int) -> dict[str, Any]:
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": hit.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": hit.answer, "refusal": None},
                     "logprobs": None, "finish_reason": hit.finish_reason}],
        "usage": _usage(hit),
    }


def _chunks(hit: Hit, completion_id: str, created: int, *, with_usage: bool) -> Iterable[dict[str, Any]]:
    def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": hit.model,
                "choices": choices, **extra}

    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    for piece in answer_pieces(hit.answer):
        yield chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
    yield chunk([{"index": 0, "delta": {}, "finish_reason": hit.finish_reason}])
    if with_usage:
        yield chunk([], usage=_usage(hit))


async def completion_keep(plan: CompletionPlan, *, body: bytes) -> None:
    """After a miss, a whole completion: kept when it is one plain text answer."""
    try:
        payload = json.loads(body)
        [choice] = payload["choices"]
        message = choice["message"]
    except (ValueError, KeyError, TypeError):
        return
    if isinstance(message.get("content"), str) and not message.get("tool_calls"):
        await _keep(plan, answer=message["content"], model=payload.get("model") or plan.model,
                    finish_reason=choice.get("finish_reason") or "stop", usage=payload.get("usage"))


async def stream_keep(plan: CompletionPlan, *, events: list[bytes], usage: Usage | None) -> None:
    """After a miss, a finished stream: kept when it was one plain text answer."""
    parts, finish_reason, model = [], "stop", plan.model
    for event in events:
        try:
            payload = json.loads(event.partition(b":")[2])
        except ValueError:
            continue
        model = payload.get("model") or model
        for choice in payload.get("choices") or ():
            delta = choice.get("delta") or {}
            if choice.get("index", 0) != 0 or delta.get("tool_calls"):
                return
            parts.append(str(delta.get("content") or ""))
            finish_reason = choice.get("finish_reason") or finish_reason
    usage_body = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens} if usage else None
    await _keep(plan, answer="".join(parts), model=model, finish_reason=finish_reason, usage=usage_body)


async def _keep(plan: CompletionPlan, *, answer: str, model: str, finish_reason: str, usage: Any) -> None:
    """Never raises: a cache that cannot keep an answer must not fail the call that made it."""
    if plan.cache_key is None or not answer or not isinstance(usage, dict):
        return
    try:
        await db_after(
            request_keep, tenant_id=plan.tenant_id, key=plan.cache_key, question=plan.cache_question, answer=answer,
            model=model, finish_reason=finish_reason, prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
    except Exception:
        logger.warning("response cache: /v1 answer for tenant %s not kept", plan.tenant_id, exc_info=True)
