"""A finished batch's output and error files, in OpenAI's batch output format (one JSON object
per line: `id`, `custom_id`, `response` {status_code, request_id, body}, `error`)."""

from __future__ import annotations

import json
import uuid

from .models import Batch, BatchLine, File


def _entry(batch: Batch, line: BatchLine) -> bytes:
    entry = {
        "id": f"batch_req_{uuid.uuid5(batch.id, str(line.index)).hex}", "custom_id": line.custom_id,
        "response": line.response, "error": line.error,
    }
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def batch_files_write(batch: Batch) -> tuple[File | None, File | None]:
    """The output file (answered lines) and the error file (failed and unrun lines); None when
    a file would be empty, as OpenAI leaves `output_file_id` / `error_file_id` null."""
    output, errors = [], []
    for line in batch.lines.order_by("index").iterator(chunk_size=500):
        if line.status == BatchLine.Status.COMPLETED:
            output.append(_entry(batch, line))
        elif line.status in (BatchLine.Status.FAILED, BatchLine.Status.CANCELLED):
            errors.append(_entry(batch, line))
    return _file(batch, output, "output"), _file(batch, errors, "error")


def _file(batch: Batch, entries: list[bytes], kind: str) -> File | None:
    if not entries:
        return None
    content = b"".join(entries)
    return File.objects.create(
        tenant_id=batch.tenant_id, purpose=File.Purpose.BATCH_OUTPUT, filename=f"{batch.public_id}_{kind}.jsonl",
        bytes=len(content), content=content,
    )
