"""The simulator's Batch API: `/v1/files` and `/v1/batches`, in memory, shaped like OpenAI's.

A batch is `validating` when created and runs on the first retrieve at least `delay_s` after
it was created (0: the first retrieve): every line goes through the same planner as a chat
completion (directives included: `[[sim:status=500]]` makes that line an error-file entry),
the output and error files are written, and the batch is `completed`. `hold = True` keeps
batches `in_progress` (to test cancelling and expiry); a cancel answers `cancelling` and the
next retrieve `cancelled`. `Simulator(batches=False)` answers 404 on every path here, like an
OpenAI-compatible server without a Batch API.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
import uuid
from typing import Any

from .asgi import Headers, Scope, Send, dumps, send_json
from .errors import ApiError
from .plan import plan_reply
from .request import parse_chat_request
from .wire import completion_body

WINDOW_S = 24 * 3600


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body: field name → (filename, bytes). Raises ApiError (400)."""
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, "expected multipart/form-data")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            fields[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return fields


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return ""


class BatchApi:
    """Files and batches of one simulator (every key shares them; ids are unguessable)."""

    def __init__(self, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.hold = False
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.lines_run = 0
        self._lock = threading.Lock()

    def reset(self) -> None:
        with self._lock:
            self.hold = False
            self.files.clear()
            self.contents.clear()
            self.batches.clear()
            self.lines_run = 0

    async def route(self, scope: Scope, method: str, path: str, body: bytes, send: Send) -> bool:
        """Answer a files or batches request; False when the path is not one of ours."""
        parts = path.strip("/").split("/")[1:]  # below "v1"
        if not parts or parts[0] not in ("files", "batches"):
            return False
        status, payload, headers = self._dispatch(scope, method, parts, body)
        if isinstance(payload, bytes):
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
        else:
            await send_json(send, status, payload, headers)
        return True

    def _dispatch(self, scope: Scope, method: str, parts: list[str], body: bytes) -> tuple[int, Any, Headers]:
        with self._lock:
            if parts == ["files"] and method == "POST":
                return 200, self._file_create(_header(scope, b"content-type"), body), []
            if parts[0] == "files" and len(parts) == 2 and method == "GET":
                return 200, self._file(parts[1]), []
            if parts[0] == "files" and len(parts) == 3 and parts[2] == "content" and method == "GET":
                self._file(parts[1])
                return 200, self.contents[parts[1]], [(b"content-type", b"application/octet-stream")]
            if parts == ["batches"] and method == "POST":
                return 200, self._batch_create(body), []
            if parts == ["batches"] and method == "GET":
                data = sorted(self.batches.values(), key=lambda b: b["created_at"], reverse=True)
                return 200, {"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None}, []
            if parts[0] == "batches" and len(parts) == 2 and method == "GET":
                return 200, self._batch_advance(self._batch(parts[1])), []
            if parts[0] == "batches" and len(parts) == 3 and parts[2] == "cancel" and method == "POST":
                return 200, self._batch_cancel(self._batch(parts[1])), []
        raise ApiError(404, f"Invalid URL ({method} /v1/{'/'.join(parts)})")

    # --- files --------------------------------------------------------------------------

    def _file_create(self, content_type: str, body: bytes) -> dict[str, Any]:
        fields = parse_multipart(content_type, body)
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if "file" not in fields or not purpose:
            raise ApiError(400, "'file' and 'purpose' are required", param="file")
        filename, content = fields["file"]
        return self._store(content, filename=filename or "upload.jsonl", purpose=purpose)

    def _store(self, content: bytes, *, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        self.files[file_id] = {
            "id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
            "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
            "expires_at": None,
        }
        self.contents[file_id] = content
        return self.files[file_id]

    def _file(self, file_id: str) -> dict[str, Any]:
        if file_id not in self.files:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return self.files[file_id]

    # --- batches ------------------------------------------------------------------------

    def _batch_create(self, body: bytes) -> dict[str, Any]:
        try:
            request = json.loads(body)
        except ValueError:
            raise ApiError(400, "the body is not JSON") from None
        if not isinstance(request, dict):
            raise ApiError(400, "the body must be a JSON object")
        self._file(str(request.get("input_file_id")))
        if request.get("endpoint") != "/v1/chat/completions":
            raise ApiError(400, "only /v1/chat/completions is supported", param="endpoint")
        if request.get("completion_window") != "24h":
            raise ApiError(400, "completion_window must be 24h", param="completion_window")
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        self.batches[batch_id] = {
            "id": batch_id, "object": "batch", "endpoint": request["endpoint"], "errors": None,
            "input_file_id": request["input_file_id"], "completion_window": "24h", "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + WINDOW_S, "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": request.get("metadata") or None,
        }
        return self.batches[batch_id]

    def _batch(self, batch_id: str) -> dict[str, Any]:
        if batch_id not in self.batches:
            raise ApiError(404, f"No such Batch object: {batch_id}", param="id")
        return self.batches[batch_id]

    def _batch_cancel(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["status"] in ("validating", "in_progress"):
            batch.update(status="cancelling", cancelling_at=int(time.time()))
        return batch

    def _batch_advance(self, batch: dict[str, Any]) -> dict[str, Any]:
        now = int(time.time())
        if batch["status"] == "cancelling":
            batch.update(status="cancelled", cancelled_at=now)
        elif batch["status"] == "validating":
            lines = self.contents[batch["input_file_id"]].decode().splitlines()
            batch["request_counts"]["total"] = sum(1 for line in lines if line.strip())
            batch.update(status="in_progress", in_progress_at=now)
        if batch["status"] == "in_progress" and not self.hold and time.time() - batch["created_at"] >= self.delay_s:
            self._batch_run(batch)
        return batch

    def _batch_run(self, batch: dict[str, Any]) -> None:
        output, errors = [], []
        for line in self.contents[batch["input_file_id"]].decode().splitlines():
            if line.strip():
                entry, ok = self._line_run(json.loads(line))
                (output if ok else errors).append(dumps(entry))
                self.lines_run += 1
        now = int(time.time())
        batch["request_counts"].update(completed=len(output), failed=len(errors))
        if output:
            batch["output_file_id"] = self._store(b"\n".join(output) + b"\n", filename="batch_output.jsonl",
                                                  purpose="batch_output")["id"]
        if errors:
            batch["error_file_id"] = self._store(b"\n".join(errors) + b"\n", filename="batch_errors.jsonl",
                                                 purpose="batch_output")["id"]
        batch.update(status="completed", finalizing_at=now, completed_at=now)

    def _line_run(self, line: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        request_id = f"req_{uuid.uuid4().hex}"
        entry: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": line.get("custom_id"),
                                 "response": None, "error": None}
        try:
            request = parse_chat_request(dumps({**line.get("body", {}), "stream": False}))
            if request.directives.status is not None:
                raise ApiError(request.directives.status, "Simulated error in a batch line.")
        except ApiError as error:
            entry["response"] = {"status_code": error.status, "request_id": request_id, "body": error.body()}
            return entry, False
        plan = plan_reply(request, request.directives, ttft_ms=0, tps=0)
        entry["response"] = {"status_code": 200, "request_id": request_id, "body": completion_body(plan)}
        return entry, True
