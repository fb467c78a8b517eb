"""A question's embedding, billed like every upstream call (billing.metering: hold, call, book).

Any failure — no price for the embedding model, a cap that does not fit it, the provider
refusing or timing out — is a cache miss, never a failed turn: the caller answers as usual.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from django.conf import settings
from django.db import transaction

from billing.caps import CapExceeded, Subject
from billing.metering import CallFacts, Hold, call_book, call_hold
from billing.models import ModelPrice, UsageRecord
from billing.services import PriceMissing, price_for
from config.db import database_sync_to_async
from llm.embeddings import Embedding, provider_embed
from llm.gateway import ProviderTarget, UpstreamError, Usage
from llm.tokens import count_text

logger = logging.getLogger(__name__)


def embedding_hold(*, subject: Subject, text: str) -> Hold:
    """Price the embedding and hold its worst case. Raises PriceMissing, CapExceeded."""
    model = settings.RESPONSE_CACHE_EMBEDDING_MODEL
    price = price_for(model, kind=ModelPrice.Kind.EMBEDDING)
    with transaction.atomic():
        return call_hold(
            subject=subject, price=price, model=model, prompt_tokens=count_text(text, "gpt-4"), max_tokens=0,
            call_id=f"emb-{uuid.uuid4()}",
        )


def embedding_book(
    *, hold: Hold, embedding: Embedding | None, outcome: str, latency_ms: int, conversation_id: uuid.UUID | None,
    error: BaseException | None = None,
) -> None:
    usage = None
    if embedding is not None and embedding.prompt_tokens is not None:
        usage = Usage(prompt_tokens=embedding.prompt_tokens, completion_tokens=0, cached_tokens=0)
    call_book(hold=hold, usage=usage, error=error, facts=CallFacts(
        kind=UsageRecord.Kind.EMBEDDING, outcome=outcome, conversation_id=conversation_id, latency_ms=latency_ms,
    ))


async def question_embed(
    *, target: ProviderTarget, subject: Subject, text: str, conversation_id: uuid.UUID | None = None
) -> tuple[float, ...] | None:
    """The question's unit vector, or None (a miss) when it cannot be had."""
    try:
        hold = await database_sync_to_async(embedding_hold)(subject=subject, text=text)
    except (PriceMissing, CapExceeded) as error:
        logger.warning("response cache: tenant %s, no embedding (%s)", subject.tenant_id, type(error).__name__)
        return None
    book = database_sync_to_async(embedding_book)
    started = time.monotonic()
    try:
        embedding = await provider_embed(target=target, model=hold.model, text=text)
    except UpstreamError as error:
        logger.warning("response cache: tenant %s, embedding failed (%s)", subject.tenant_id, error.code)
        await book(hold=hold, embedding=None, outcome=UsageRecord.Outcome.ERROR, error=error,
                   latency_ms=int((time.monotonic() - started) * 1000), conversation_id=conversation_id)
        return None
    except asyncio.CancelledError:
        await asyncio.shield(book(hold=hold, embedding=None, outcome=UsageRecord.Outcome.CANCELLED,
                                  latency_ms=int((time.monotonic() - started) * 1000), conversation_id=conversation_id))
        raise
    await book(hold=hold, embedding=embedding, outcome=UsageRecord.Outcome.OK,
               latency_ms=int((time.monotonic() - started) * 1000), conversation_id=conversation_id)
    return embedding.vector
