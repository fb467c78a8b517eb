"""Celery tasks of the chat engine: thin wrappers that take ids and call services."""

from __future__ import annotations

import uuid

from asgiref.sync import async_to_sync
from celery import shared_task

from billing.caps import CapExceeded
from llm.gateway import UpstreamError

from . import recovery, summaries


@shared_task(
    acks_late=True,
    autoretry_for=(UpstreamError,),
    retry_backoff=True,
    retry_backoff_max=300,
    max_retries=5,
    soft_time_limit=120,
    time_limit=180,
)
def summarize_conversation(tenant_id: int, conversation_id: str) -> bool:
    """Idempotent: a no-op when the history is already compact or another worker holds the
    claim. Over a cap, it gives up quietly: trimming keeps the conversation working."""
    try:
        return summaries.conversation_summarize(tenant_id=tenant_id, conversation_id=uuid.UUID(conversation_id))
    except CapExceeded:
        return False


@shared_task(acks_late=True, soft_time_limit=60, time_limit=90)
def generations_recover_stale() -> int:
    """Beat: store, bill and free every generation whose process stopped beating."""
    return async_to_sync(recovery.generations_recover)()
