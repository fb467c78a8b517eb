"""A batch on the provider's Batch API: cancel it there when asked, and when it ends fetch its
output and error files, book each answered line at the batch price and end the batch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from billing.services import Price
from llm.batches import LineAnswer, provider_batch_cancel, provider_batch_retrieve, provider_file_content
from llm.transport import UpstreamError

from .execution import batch_end, line_answered, provider_target
from .models import Batch, BatchLine

logger = logging.getLogger(__name__)

PROVIDER_ENDED = {
    "completed": Batch.Status.COMPLETED, "failed": Batch.Status.FAILED,
    "expired": Batch.Status.EXPIRED, "cancelled": Batch.Status.CANCELLED,
}


def batch_poll_provider(batch: Batch) -> bool:
    """One look at the provider's batch. True when the batch ended. Raises UpstreamError."""
    target = provider_target(batch.tenant_id)
    if batch.status == Batch.Status.CANCELLING:
        with contextlib.suppress(UpstreamError):  # already ending there: the retrieve says how
            asyncio.run(provider_batch_cancel(target, batch.provider_batch_id))
    remote = asyncio.run(provider_batch_retrieve(target, batch.provider_batch_id))
    if remote.status not in PROVIDER_ENDED:
        return False
    prices: dict[str, Price] = {}
    for file_id in (remote.output_file_id, remote.error_file_id):
        if file_id:
            results_apply(batch, asyncio.run(provider_file_content(target, file_id)), prices=prices)
    return batch_end(batch, PROVIDER_ENDED[remote.status])


def results_apply(batch: Batch, content: bytes, *, prices: dict[str, Price]) -> int:
    """Store and book every line of a provider's output or error file; returns how many were
    new. A line the file names twice, or that was booked already, is booked once."""
    pending = {line.custom_id: line for line in batch.lines.filter(status=BatchLine.Status.PENDING)}
    applied = 0
    for raw in content.decode("utf-8", errors="replace").splitlines():
        try:
            item = json.loads(raw) if raw.strip() else None
        except ValueError:
            logger.warning("batch %s: the provider's result file has a line that is not JSON", batch.public_id)
            continue
        line = pending.pop(item.get("custom_id"), None) if isinstance(item, dict) else None
        if line is None:
            continue
        response = item.get("response")
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            body = response.get("body") if isinstance(response.get("body"), dict) else {}
            line_answered(batch, line, LineAnswer(status_code=response["status_code"], body=body),
                          batch_priced=True, prices=prices, request_id=str(response.get("request_id") or ""))
        else:
            BatchLine.objects.filter(pk=line.pk, status=BatchLine.Status.PENDING).update(
                status=BatchLine.Status.FAILED, error=item.get("error") or {"code": "batch_failed", "message": ""})
        applied += 1
    return applied
