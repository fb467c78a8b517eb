"""Running a batch: on the provider's own Batch API when it has one (polled until it ends, each
line booked at the batch price), else line by line by Parley's workers (bounded concurrency,
resumable, each line booked once at the normal price); ending it (output and error files, the
hold settled). Every step claims the batch with a conditional update, so two workers never run
the same batch, and a dead worker's claim lapses after BATCH_CLAIM_SECONDS."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q, Sum
from django.utils import timezone

from billing.batch_holds import batch_hold_grow, batch_hold_left, batch_line_book, batch_settle
from billing.services import Price, price_for
from llm.batches import BatchesUnsupported, LineAnswer, completions_run, provider_batch_submit
from llm.gateway import Usage
from llm.tokens import count_request_prompt, count_text
from llm.transport import ProviderTarget
from tenants.callers import Caller
from tenants.services import credential_default

from .models import ENDED, Batch, BatchLine
from .outputs import batch_files_write

logger = logging.getLogger(__name__)


class NoCredential(Exception):
    pass


def provider_target(tenant_id: int) -> ProviderTarget:
    """Where the tenant's batches go: its default provider credential (as `/v1` calls do)."""
    credential = credential_default(tenant_id=tenant_id)
    if credential is None:
        raise NoCredential("the tenant has no provider credential configured")
    return ProviderTarget(credential_id=credential.pk, base_url=credential.base_url, api_key=credential.api_key,
                          organization=credential.organization, version=credential.updated_at.timestamp())


def batch_claim(batch_id: uuid.UUID) -> Batch | None:
    """Take the batch for one step, unless it ended or another worker's claim is live."""
    now = timezone.now()
    claimed = Batch.objects.filter(pk=batch_id).exclude(status__in=ENDED).filter(
        Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    ).update(claimed_until=now + timedelta(seconds=settings.BATCH_CLAIM_SECONDS))
    return Batch.objects.get(pk=batch_id) if claimed else None


def batch_unclaim(batch: Batch) -> None:
    Batch.objects.filter(pk=batch.pk).update(claimed_until=None)


def batch_jsonl(batch: Batch) -> bytes:
    """The lines as sent to the provider (each body with its `max_tokens`)."""
    import json

    rows = batch.lines.order_by("index").values_list("custom_id", "body")
    return b"".join(
        json.dumps({"custom_id": custom_id, "method": "POST", "url": batch.endpoint, "body": body},
                   separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
        for custom_id, body in rows
    )


def batch_begin(batch: Batch) -> str:
    """Start a validated batch: on the provider's Batch API, or — it has none — mark it for
    Parley's workers. Returns the mode. Raises UpstreamError (tried again by the sweep)."""
    try:
        target = provider_target(batch.tenant_id)
    except NoCredential as error:
        batch_end(batch, Batch.Status.FAILED, errors=[{"code": "no_credential", "message": str(error)}])
        return ""
    started = {"status": Batch.Status.IN_PROGRESS, "in_progress_at": timezone.now()}
    try:
        provider_id = asyncio.run(provider_batch_submit(target, jsonl=batch_jsonl(batch), metadata=batch.metadata))
    except BatchesUnsupported:
        _hold_at_normal_price(batch)
        Batch.objects.filter(pk=batch.pk, status=Batch.Status.VALIDATING).update(**started)
        Batch.objects.filter(pk=batch.pk).update(mode=Batch.Mode.LOCAL)  # a cancelling batch keeps its status
        return Batch.Mode.LOCAL
    Batch.objects.filter(pk=batch.pk, status=Batch.Status.VALIDATING).update(**started)
    Batch.objects.filter(pk=batch.pk).update(mode=Batch.Mode.PROVIDER, provider_batch_id=provider_id)
    return Batch.Mode.PROVIDER


# --- local mode: Parley runs the lines ----------------------------------------------------


def _hold_at_normal_price(batch: Batch) -> None:
    """Run by Parley, the lines cost the normal price: hold the difference too. Refused by a
    cap, the batch runs the lines its hold covers (`_fitting`) and the rest fail at no cost."""
    normal = batch.lines.aggregate(total=Sum("worst_case_usd"))["total"] or Decimal(0)
    extra = normal - batch.held_usd
    if batch.reservation_id is None or extra <= 0:
        return
    if batch_hold_grow(reservation_id=batch.reservation_id, amount=extra):
        Batch.objects.filter(pk=batch.pk).update(held_usd=normal)


def batch_run_local(batch: Batch) -> bool:
    """Run pending lines in rounds of BATCH_LOCAL_CONCURRENCY for up to BATCH_RUN_SECONDS.
    Returns True when the batch ended, False when lines are left (run again to resume)."""
    target = provider_target(batch.tenant_id)
    prices: dict[str, Price] = {}
    stop_at = time.monotonic() + settings.BATCH_RUN_SECONDS
    while True:
        batch.refresh_from_db()
        if batch.status == Batch.Status.CANCELLING:
            return batch_end(batch, Batch.Status.CANCELLED)
        if timezone.now() >= batch.expires_at:
            return batch_end(batch, Batch.Status.EXPIRED)
        pending = list(batch.lines.filter(status=BatchLine.Status.PENDING)[: settings.BATCH_LOCAL_CONCURRENCY])
        if not pending:
            return batch_end(batch, Batch.Status.COMPLETED)
        Batch.objects.filter(pk=batch.pk).update(
            claimed_until=timezone.now() + timedelta(seconds=settings.BATCH_CLAIM_SECONDS))
        admitted = _fitting(batch, pending)
        answers = asyncio.run(completions_run(target, [line.body for line in admitted],
                                              concurrency=settings.BATCH_LOCAL_CONCURRENCY))
        for line, answer in zip(admitted, answers, strict=True):
            line_answered(batch, line, answer, batch_priced=False, prices=prices)
        if time.monotonic() >= stop_at:
            return False


def _fitting(batch: Batch, pending: list[BatchLine]) -> list[BatchLine]:
    """The lines whose worst case at the normal price the batch's hold still covers (it was
    held at the batch price); the others fail with `spending_cap_exceeded` and cost nothing."""
    left = batch_hold_left(batch.reservation_id)
    admitted = []
    for line in pending:
        if left is None or line.worst_case_usd <= left:
            admitted.append(line)
            left = None if left is None else left - line.worst_case_usd
            continue
        error = {"message": "the batch's hold on the spending caps does not cover this line at the normal price",
                 "type": "rate_limit_error", "code": "spending_cap_exceeded"}
        BatchLine.objects.filter(pk=line.pk, status=BatchLine.Status.PENDING).update(
            status=BatchLine.Status.FAILED, response={"status_code": 429, "body": {"error": error}})
    return admitted


def _usage(line: BatchLine, body: dict[str, Any]) -> Usage:
    """The provider's usage of a line's answer; counted with tiktoken when it sent none."""
    usage = body.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        details = usage.get("prompt_tokens_details") or {}
        return Usage(prompt_tokens=usage["prompt_tokens"], completion_tokens=int(usage.get("completion_tokens") or 0),
                     cached_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0)
    choices = body.get("choices") or [{}]
    content = "".join(str((c.get("message") or {}).get("content") or "") for c in choices if isinstance(c, dict))
    return Usage(prompt_tokens=count_request_prompt(line.body, line.model),
                 completion_tokens=count_text(content, line.model), cached_tokens=0)


def line_answered(
    batch: Batch, line: BatchLine, answer: LineAnswer, *, batch_priced: bool, prices: dict[str, Price],
    request_id: str = "",
) -> None:
    """Store one line's answer and book it (a 200: one ledger row; an error costs nothing), once."""
    ok = answer.status_code == 200
    response = {"status_code": answer.status_code, "request_id": request_id or f"req_{uuid.uuid4().hex}",
                "body": answer.body}
    with transaction.atomic():
        stored = BatchLine.objects.filter(pk=line.pk, status=BatchLine.Status.PENDING).update(
            status=BatchLine.Status.COMPLETED if ok else BatchLine.Status.FAILED, response=response)
        if not stored or not ok:
            return
        if line.model not in prices:
            prices[line.model] = price_for(line.model, tenant_id=batch.tenant_id)
        batch_line_book(
            batch_id=batch.pk, index=line.index, reservation_id=batch.reservation_id,
            subject=Caller(tenant_id=batch.tenant_id, api_key_id=batch.api_key_id), model=line.model,
            price=prices[line.model], usage=_usage(line, answer.body), batch_priced=batch_priced,
        )


# --- the end ------------------------------------------------------------------------------

END_STAMP = {
    Batch.Status.COMPLETED: "completed_at", Batch.Status.FAILED: "failed_at",
    Batch.Status.EXPIRED: "expired_at", Batch.Status.CANCELLED: "cancelled_at",
}
UNRUN_CODE = {Batch.Status.EXPIRED: "batch_expired", Batch.Status.CANCELLED: "batch_cancelled",
              Batch.Status.FAILED: "batch_failed", Batch.Status.COMPLETED: "batch_failed"}


def batch_end(batch: Batch, status: str, *, errors: list[dict[str, Any]] | None = None) -> bool:
    """End the batch once: lines not run are closed (they cost nothing), the output and error
    files written, the hold's rest given back, counts and cost stored. Returns True."""
    now = timezone.now()
    BatchLine.objects.filter(batch=batch, status=BatchLine.Status.PENDING).update(
        status=BatchLine.Status.CANCELLED,
        error={"code": UNRUN_CODE[status], "message": f"the batch was {status} before this request ran"},
    )
    with transaction.atomic():
        if not Batch.objects.filter(pk=batch.pk).exclude(status__in=ENDED).update(status=status, finalizing_at=now):
            return True  # another worker ended it
        output, error = batch_files_write(batch)
        cost = batch_settle(batch_id=batch.pk, reservation_id=batch.reservation_id)
        counts = {s: batch.lines.filter(status=s).count() for s in (BatchLine.Status.COMPLETED, BatchLine.Status.FAILED)}
        Batch.objects.filter(pk=batch.pk).update(
            output_file=output, error_file=error, cost_usd=cost, claimed_until=None,
            completed=counts[BatchLine.Status.COMPLETED], failed=counts[BatchLine.Status.FAILED],
            errors={"object": "list", "data": errors} if errors else None, **{END_STAMP[status]: now},
        )
    batch.refresh_from_db()
    return True
