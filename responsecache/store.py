"""Stored answers: find one (by key, or by similarity over a bounded candidate set), keep one,
count a hit, book a hit in the ledger. Synchronous: callers on an event loop hop here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from billing.caps import Subject
from billing.metering import CallFacts, answer_cached_book
from billing.models import UsageRecord
from billing.services import Price

from .keys import question_numbers, question_terms, similarity, terms_swapped, vector_pack, vector_unpack
from .models import CachedAnswer


@dataclass(frozen=True)
class Hit:
    """A stored answer being reused."""

    id: object
    answer: str
    finish_reason: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    similarity: float = 1.0  # 1: the same (normalised) question


def _hit(row: CachedAnswer, score: float = 1.0) -> Hit:
    return Hit(id=row.pk, answer=row.answer, finish_reason=row.finish_reason, model=row.model,
               prompt_tokens=row.prompt_tokens, completion_tokens=row.completion_tokens, similarity=score)


def _live(*, tenant_id: int, scope: str):
    return CachedAnswer.objects.for_tenant(tenant_id).filter(scope=scope, expires_at__gt=timezone.now())


def answer_exists(*, tenant_id: int, scope: str, key: str) -> bool:
    """A live answer is filed under exactly this key (not counted as a hit)."""
    return _live(tenant_id=tenant_id, scope=scope).filter(key=key).exists()


def answer_find(*, tenant_id: int, scope: str, key: str) -> Hit | None:
    """The live answer filed under exactly this key, counted as a hit."""
    row = _live(tenant_id=tenant_id, scope=scope).filter(key=key).first()
    return _counted(row) if row is not None else None


def answer_find_similar(*, tenant_id: int, scope: str, vector: tuple[float, ...], question: str) -> Hit | None:
    """The live semantic answer closest to `vector`, if it reaches RESPONSE_CACHE_SIMILARITY,
    its question names the same numbers as this one (`question_numbers`) and neither question
    names a thing the other does not (`terms_swapped`). Compares the
    scope's RESPONSE_CACHE_CANDIDATES newest entries (a bound, so a lookup costs the same
    however long the cache grows; older entries still hit by their exact key)."""
    rows = (
        _live(tenant_id=tenant_id, scope=scope).filter(kind=CachedAnswer.Kind.SEMANTIC)
        .only("id", "embedding", "question")[: settings.RESPONSE_CACHE_CANDIDATES]
    )
    numbers, terms = question_numbers(question), question_terms(question)
    best, best_score = None, settings.RESPONSE_CACHE_SIMILARITY
    for row in rows:
        if question_numbers(row.question) != numbers or terms_swapped(question_terms(row.question), terms):
            continue
        score = similarity(vector, vector_unpack(bytes(row.embedding)))
        if score >= best_score:
            best, best_score = row.pk, score
    if best is None:
        return None
    row = CachedAnswer.objects.filter(pk=best).first()
    return _counted(row, best_score) if row is not None else None


def _counted(row: CachedAnswer, score: float = 1.0) -> Hit:
    CachedAnswer.objects.filter(pk=row.pk).update(hits=F("hits") + 1)
    return _hit(row, score)


@dataclass(frozen=True)
class Entry:
    """An answer to keep: a complete generation's text and what it cost in tokens."""

    tenant_id: int
    scope: str
    kind: str
    key: str
    question: str
    answer: str
    model: str
    ttl_seconds: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    assistant_id: int | None = None
    vector: tuple[float, ...] | None = None


def answer_keep(entry: Entry) -> None:
    """File the answer under its key, replacing an expired entry of the same key (a live one,
    stored meanwhile by a concurrent miss, stays: the first answer wins)."""
    now = timezone.now()
    with transaction.atomic():
        CachedAnswer.objects.for_tenant(entry.tenant_id).filter(
            scope=entry.scope, key=entry.key, expires_at__lte=now
        ).delete()
        try:
            with transaction.atomic():
                CachedAnswer.objects.create(
                    tenant_id=entry.tenant_id, assistant_id=entry.assistant_id, scope=entry.scope, kind=entry.kind,
                    key=entry.key, question=entry.question[:4000], answer=entry.answer,
                    embedding=vector_pack(entry.vector) if entry.vector else b"", model=entry.model,
                    finish_reason=entry.finish_reason, prompt_tokens=entry.prompt_tokens,
                    completion_tokens=entry.completion_tokens, expires_at=now + timedelta(seconds=entry.ttl_seconds),
                )
        except IntegrityError:
            pass


def hit_book(
    *, subject: Subject, call_id: str, model: str, price: Price, prompt_tokens: int, hit: Hit,
    conversation_id=None, message_id=None,
) -> UsageRecord:
    """The hit's ledger row (billing.metering): $0, the tokens the call would have had — this
    prompt, the stored answer's completion — and their list price as the saving."""
    return answer_cached_book(
        subject=subject, call_id=call_id, model=model, price=price, prompt_tokens=prompt_tokens,
        completion_tokens=hit.completion_tokens,
        facts=CallFacts(kind=UsageRecord.Kind.CACHED, conversation_id=conversation_id, message_id=message_id),
    )
