"""Batch tasks: start a batch, run its lines (local mode), poll it (provider mode), and beat's sweep.

Each task takes a batch id and re-loads it; each step claims the batch (execution.batch_claim),
so a task delivered twice, or a sweep racing a worker, does nothing twice."""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from llm.transport import UpstreamError

from .execution import NoCredential, batch_begin, batch_claim, batch_end, batch_run_local, batch_unclaim
from .models import ENDED, Batch
from .polling import batch_poll_provider

logger = logging.getLogger(__name__)

RETRIED_STATUSES = frozenset({408, 409, 429})
LIMITS = {"soft_time_limit": 150, "time_limit": 180}  # BATCH_RUN_SECONDS (60) per run, then a new task


@shared_task(acks_late=True, **LIMITS)
def batch_start(batch_id: str) -> None:
    """Submit a validated batch to the provider, or hand it to `batch_run` when it has no
    Batch API. An upstream failure leaves it `validating`: the sweep tries again."""
    batch = batch_claim(uuid.UUID(batch_id))
    if batch is None:
        return
    mode = batch.mode
    try:
        if batch.status == Batch.Status.CANCELLING and not batch.mode:
            batch_end(batch, Batch.Status.CANCELLED)
            return
        if not mode:
            mode = batch_begin(batch)
    except UpstreamError as error:
        if error.status is not None and 400 <= error.status < 500 and error.status not in RETRIED_STATUSES:
            # The provider refused the request itself (a bad key, a refused file): no retry mends it.
            batch_end(batch, Batch.Status.FAILED, errors=[{"code": "provider_refused", "message": error.message}])
        else:
            logger.warning("batch %s: the provider failed (%s); trying again later", batch.public_id, error)
    finally:
        batch_unclaim(batch)
    if mode == Batch.Mode.LOCAL:
        batch_run.delay(batch_id)


@shared_task(acks_late=True, **LIMITS)
def batch_run(batch_id: str) -> None:
    """Run a local-mode batch's pending lines for up to BATCH_RUN_SECONDS, then hand over to
    a fresh task (resumable: a line is answered and booked once)."""
    batch = batch_claim(uuid.UUID(batch_id))
    if batch is None:
        return
    try:
        done = batch_run_local(batch)
    except NoCredential as error:
        done = batch_end(batch, Batch.Status.FAILED, errors=[{"code": "no_credential", "message": str(error)}])
    finally:
        batch_unclaim(batch)
    if not done:
        batch_run.delay(batch_id)


@shared_task(acks_late=True, **LIMITS)
def batch_poll(batch_id: str) -> None:
    """Move a batch on: start it, resume its lines, expire it, or look at the provider's batch."""
    batch = Batch.objects.filter(pk=uuid.UUID(batch_id)).first()
    if batch is None or batch.ended:
        return
    Batch.objects.filter(pk=batch.pk).update(polled_at=timezone.now())
    if batch.mode != Batch.Mode.PROVIDER and timezone.now() >= batch.expires_at:
        claimed = batch_claim(batch.pk)
        if claimed is not None:
            batch_end(claimed, Batch.Status.EXPIRED)
        return
    if not batch.mode:
        return batch_start(batch_id)
    if batch.mode == Batch.Mode.LOCAL:
        return batch_run(batch_id)  # a no-op while a worker holds it
    claimed = batch_claim(batch.pk)
    if claimed is None:
        return
    try:
        batch_poll_provider(claimed)
    except (UpstreamError, NoCredential) as error:
        logger.warning("batch %s: polling the provider failed (%s); trying again later", batch.public_id, error)
    finally:
        batch_unclaim(claimed)


@shared_task(acks_late=True, soft_time_limit=60, time_limit=90)
def batches_sweep() -> int:
    """Beat: poll every running batch not polled for BATCH_POLL_SECONDS (provider batches,
    local batches whose worker died, batches past their window). Returns how many."""
    due = timezone.now() - timedelta(seconds=settings.BATCH_POLL_SECONDS)
    ids = list(Batch.objects.exclude(status__in=ENDED).filter(
        Q(polled_at__isnull=True) | Q(polled_at__lt=due)).values_list("id", flat=True)[:1000])
    for batch_id in ids:
        batch_poll.delay(str(batch_id))
    return len(ids)
