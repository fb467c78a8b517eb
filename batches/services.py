"""Files and batches: upload, submit (validated, the worst case held on the caps), cancel, list."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.batch_holds import batch_hold
from tenants.callers import Caller
from tenants.models import ApiKey

from .models import Batch, BatchLine, File
from .validation import ENDPOINT, InvalidBatch, lines_parse, metadata_check

WINDOW = timedelta(hours=24)
MAX_LIST = 100


class NotFound(InvalidBatch):
    def __init__(self, what: str, public_id: str) -> None:
        super().__init__(f"No such {what} object: {public_id}", param="id", status=404)


def _uuid(public_id: str, prefix: str) -> uuid.UUID | None:
    if not public_id.startswith(prefix):
        return None
    try:
        return uuid.UUID(hex=public_id[len(prefix):])
    except ValueError:
        return None


def access_file(*, tenant_id: int, file_id: str) -> File:
    """A file of this tenant; a foreign, missing or malformed id is the same 404."""
    pk = _uuid(file_id, "file-")
    file = File.objects.for_tenant(tenant_id).filter(pk=pk).first() if pk else None
    if file is None:
        raise NotFound("File", file_id)
    return file


def access_batch(*, tenant_id: int, batch_id: str) -> Batch:
    pk = _uuid(batch_id, "batch_")
    batch = Batch.objects.for_tenant(tenant_id).filter(pk=pk).first() if pk else None
    if batch is None:
        raise NotFound("Batch", batch_id)
    return batch


def file_create(*, tenant_id: int, purpose: str, filename: str, content: bytes) -> File:
    if purpose != File.Purpose.BATCH:
        raise InvalidBatch("'purpose' must be \"batch\" (the only purpose Parley stores)", param="purpose")
    if len(content) > settings.BATCH_FILE_MAX_BYTES:
        raise InvalidBatch(f"the file is {len(content)} bytes; at most {settings.BATCH_FILE_MAX_BYTES} are allowed",
                           param="file", status=413)
    return File.objects.create(tenant_id=tenant_id, purpose=purpose, filename=filename[:255] or "upload.jsonl",
                               bytes=len(content), content=content)


def batch_create(
    *, api_key: ApiKey, input_file_id: object, endpoint: object, completion_window: object, metadata: object
) -> Batch:
    """Validate every line, hold the whole batch's worst case at the batch price on the caps
    (CapExceeded: nothing is created), store it, and start it once committed."""
    if not isinstance(input_file_id, str):
        raise InvalidBatch("'input_file_id' is required", param="input_file_id")
    if endpoint != ENDPOINT:
        raise InvalidBatch(f"'endpoint' must be {ENDPOINT!r}", param="endpoint")
    if completion_window != "24h":
        raise InvalidBatch("'completion_window' must be \"24h\"", param="completion_window")
    checked_metadata = metadata_check(metadata)
    file = access_file(tenant_id=api_key.tenant_id, file_id=input_file_id)
    if file.purpose != File.Purpose.BATCH:
        raise InvalidBatch("the input file's purpose must be \"batch\"", param="input_file_id")
    lines = lines_parse(bytes(file.content), allowed_models=list(api_key.allowed_models or []),
                        tenant_id=api_key.tenant_id)
    amount = sum((line.worst_case(batch_priced=True) for line in lines), Decimal(0))
    batch_id = uuid.uuid4()
    subject = Caller(tenant_id=api_key.tenant_id, api_key_id=api_key.pk)
    with transaction.atomic():
        reservation_id = batch_hold(subject=subject, batch_id=batch_id, amount=amount)  # CapExceeded rolls back
        batch = Batch.objects.create(
            id=batch_id, tenant_id=api_key.tenant_id, api_key=api_key, input_file=file, metadata=checked_metadata,
            total=len(lines), reservation_id=reservation_id, held_usd=amount, expires_at=timezone.now() + WINDOW,
        )
        BatchLine.objects.bulk_create([
            BatchLine(batch=batch, index=line.index, custom_id=line.custom_id, model=line.model, body=line.body,
                      worst_case_usd=line.worst_case(batch_priced=False))
            for line in lines
        ], batch_size=500)
        transaction.on_commit(lambda: _start_later(batch.pk))
    return batch


def _start_later(batch_id: uuid.UUID) -> None:
    from .tasks import batch_start  # tasks import the services: resolved at call time

    batch_start.delay(str(batch_id))


def batch_cancel(*, batch: Batch) -> Batch:
    """Ask a batch to stop: `cancelling` until its worker (or the provider) stops, then
    `cancelled`; lines that did not run cost nothing. An ended batch is left as it is."""
    if batch.status in (Batch.Status.VALIDATING, Batch.Status.IN_PROGRESS, Batch.Status.FINALIZING):
        Batch.objects.filter(pk=batch.pk, status=batch.status).update(
            status=Batch.Status.CANCELLING, cancelling_at=timezone.now())
        transaction.on_commit(lambda: _poll_later(batch.pk))
    batch.refresh_from_db()
    return batch


def _poll_later(batch_id: uuid.UUID) -> None:
    from .tasks import batch_poll

    batch_poll.delay(str(batch_id))


def batch_nudge(*, batch: Batch) -> None:
    """A retrieve of a running batch: poll it now when the last poll is older than
    BATCH_POLL_SECONDS (beat polls too; this makes `retrieve` until done work without it)."""
    due = timezone.now() - timedelta(seconds=settings.BATCH_POLL_SECONDS)
    if batch.ended or (batch.polled_at is not None and batch.polled_at > due):
        return
    if Batch.objects.filter(pk=batch.pk, polled_at=batch.polled_at).update(polled_at=timezone.now()):
        _poll_later(batch.pk)


def batches_list(*, tenant_id: int, after: str | None, limit: object) -> tuple[list[Batch], bool]:
    """Newest first, OpenAI's cursor: `after` a batch id, `limit` 1–100 (default 20)."""
    try:
        count = 20 if limit is None else int(str(limit))
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_LIST:
        raise InvalidBatch(f"'limit' must be an integer from 1 to {MAX_LIST}", param="limit")
    batches = Batch.objects.for_tenant(tenant_id).order_by("-created_at", "-id")
    if after:
        anchor = access_batch(tenant_id=tenant_id, batch_id=after)
        batches = batches.filter(created_at__lte=anchor.created_at).exclude(pk=anchor.pk).exclude(
            created_at=anchor.created_at, id__gt=anchor.id)
    page = list(batches[: count + 1])
    return page[:count], len(page) > count
