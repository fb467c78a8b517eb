"""Files and batches as OpenAI's objects (what the official SDK parses)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from billing.services import money_str

from .models import Batch, File


def _ts(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def file_object(file: File) -> dict[str, Any]:
    return {
        "id": file.public_id, "object": "file", "bytes": file.bytes, "created_at": _ts(file.created_at),
        "filename": file.filename, "purpose": file.purpose, "status": "processed", "status_details": None,
        "expires_at": None,
    }


def batch_object(batch: Batch) -> dict[str, Any]:
    """OpenAI's Batch object, plus Parley's own `parley` object (mode and cost); the SDK keeps
    unknown fields as extras."""
    return {
        "id": batch.public_id, "object": "batch", "endpoint": batch.endpoint, "errors": batch.errors,
        "input_file_id": f"file-{batch.input_file_id.hex}",
        "completion_window": batch.completion_window, "status": batch.status,
        "output_file_id": f"file-{batch.output_file_id.hex}" if batch.output_file_id else None,
        "error_file_id": f"file-{batch.error_file_id.hex}" if batch.error_file_id else None,
        "created_at": _ts(batch.created_at), "in_progress_at": _ts(batch.in_progress_at),
        "expires_at": _ts(batch.expires_at), "finalizing_at": _ts(batch.finalizing_at),
        "completed_at": _ts(batch.completed_at), "failed_at": _ts(batch.failed_at),
        "expired_at": _ts(batch.expired_at), "cancelling_at": _ts(batch.cancelling_at),
        "cancelled_at": _ts(batch.cancelled_at),
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "metadata": batch.metadata,
        "parley": {"mode": batch.mode or None, "cost_usd": money_str(batch.cost_usd),
                   "held_usd": money_str(batch.held_usd)},
    }
