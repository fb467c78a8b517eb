"""The `/v1` side: whole requests of an opted-in API key, cached exactly, per tenant.

A request is eligible when its answer should not vary: `temperature` 0, or the caller asked
for it (`X-Parley-Cache: on`); one choice only. Its key is the canonical JSON of the body
minus `user`, `stream` and `stream_options` (`keys.request_key`)."""

from __future__ import annotations

from typing import Any

from .keys import request_key
from .models import CachedAnswer
from .store import Entry, Hit, answer_exists, answer_find, answer_keep

V1_SCOPE = "v1"
V1_TTL_SECONDS = 86_400


def request_cache_key(body: dict[str, Any], *, asked: bool) -> str | None:
    """The request's cache key, or None when it is not eligible."""
    if body.get("n") not in (None, 1):
        return None
    temperature = body.get("temperature")
    if not asked and not (temperature is not None and not isinstance(temperature, bool) and temperature == 0):
        return None
    return request_key(body)


def request_cached(*, tenant_id: int, key: str) -> bool:
    """The request would be answered from the cache (asked before routing; not a hit yet)."""
    return answer_exists(tenant_id=tenant_id, scope=V1_SCOPE, key=key)


def request_find(*, tenant_id: int, key: str) -> Hit | None:
    return answer_find(tenant_id=tenant_id, scope=V1_SCOPE, key=key)


def request_keep(
    *, tenant_id: int, key: str, question: str, answer: str, model: str, finish_reason: str,
    prompt_tokens: int, completion_tokens: int,
) -> None:
    """Keep a complete answer (a miss's) for `V1_TTL_SECONDS`; `question` is what the admin shows."""
    answer_keep(Entry(
        tenant_id=tenant_id, scope=V1_SCOPE, kind=CachedAnswer.Kind.REQUEST, key=key, question=question,
        answer=answer, model=model, ttl_seconds=V1_TTL_SECONDS, prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens, finish_reason=finish_reason,
    ))
