"""The response cache of a chat turn: which turns may use it, the lookup before the model is
called, and keeping a complete answer after a miss.

A cacheable turn is one whose answer depends only on the question: the first user message of
a conversation (no history, no summary), for an assistant with `response_cache` on and no
tools. `exact` matches the normalised question; `semantic` tries that first, then embeds the
question (billed) and matches the closest stored answer above RESPONSE_CACHE_SIMILARITY.
Everything is filed per tenant and per assistant version (`keys.assistant_version`).
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from billing.caps import Subject
from config.db import database_sync_to_async
from llm.gateway import ProviderTarget

from . import keys, store
from .models import CachedAnswer
from .semantic import question_embed
from .store import Entry, Hit, hit_book

logger = logging.getLogger(__name__)

__all__ = ["CacheScope", "Hit", "Lookup", "answer_lookup", "answer_pieces", "answer_remember", "hit_book",
           "turn_cache_scope"]


@dataclass(frozen=True)
class CacheScope:
    """Where a cacheable turn's answer is looked up and filed."""

    tenant_id: int
    assistant_id: int
    scope: str
    semantic: bool
    ttl_seconds: int
    model: str


def turn_cache_scope(*, assistant: Any, first_turn: bool, tools: Any) -> CacheScope | None:
    """The turn's cache scope, or None when the turn is not cacheable."""
    if assistant.response_cache == "off" or not first_turn or tools or assistant.tools:
        return None
    return CacheScope(
        tenant_id=assistant.tenant_id, assistant_id=assistant.pk,
        scope=keys.assistant_scope(assistant_id=assistant.pk, version=keys.assistant_version(assistant)),
        semantic=assistant.response_cache == "semantic", ttl_seconds=assistant.response_cache_ttl,
        model=assistant.model,
    )


@dataclass(frozen=True)
class Lookup:
    """One turn's lookup: the hit, or on a miss what filing the answer needs."""

    scope: CacheScope
    question: str
    key: str
    hit: Hit | None
    vector: tuple[float, ...] | None = None


async def answer_lookup(
    scope: CacheScope | None, *, question: str, target: ProviderTarget, subject: Subject,
    conversation_id: uuid.UUID,
) -> Lookup | None:
    """The stored answer to this question, if any (counted as a hit); None: not cacheable."""
    if scope is None:
        return None
    key = keys.question_key(question)
    find = database_sync_to_async(store.answer_find)
    hit = await find(tenant_id=scope.tenant_id, scope=scope.scope, key=key)
    if hit is not None or not scope.semantic:
        return Lookup(scope=scope, question=question, key=key, hit=hit)
    vector = await question_embed(target=target, subject=subject, text=question, conversation_id=conversation_id)
    if vector is not None:
        hit = await database_sync_to_async(store.answer_find_similar)(
            tenant_id=scope.tenant_id, scope=scope.scope, vector=vector, question=question
        )
    return Lookup(scope=scope, question=question, key=key, hit=hit, vector=vector)


async def answer_remember(
    lookup: Lookup, *, answer: str, model: str, prompt_tokens: int, completion_tokens: int, finish_reason: str
) -> None:
    """File a complete answer after a miss, under the model that wrote it (a route's choice,
    which a hit's message names). Never raises: a cache that cannot keep an answer must not
    fail the turn that produced it."""
    scope = lookup.scope
    if lookup.hit is not None or not answer:
        return
    entry = Entry(
        tenant_id=scope.tenant_id, assistant_id=scope.assistant_id, scope=scope.scope,
        kind=CachedAnswer.Kind.SEMANTIC if lookup.vector else CachedAnswer.Kind.EXACT, key=lookup.key,
        question=keys.question_normalised(lookup.question), answer=answer, model=model or scope.model,
        ttl_seconds=scope.ttl_seconds, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        finish_reason=finish_reason or "stop", vector=lookup.vector,
    )
    try:
        await database_sync_to_async(store.answer_keep)(entry)
    except Exception:
        logger.warning("response cache: answer for tenant %s not kept", scope.tenant_id, exc_info=True)


_PIECE = re.compile(r"\S+\s*|\s+")


def answer_pieces(answer: str, *, words: int = 4) -> list[str]:
    """A stored answer cut into deltas of a few words, so it streams like a generated one."""
    parts = _PIECE.findall(answer)
    return ["".join(parts[i:i + words]) for i in range(0, len(parts), words)] or [answer]
