"""The provider's Batch API (files + batches) and single non-streamed completions, for batch jobs.

Called from Celery tasks, each operation on a client of its own (closed after): a task's event
loop lives for one `asyncio.run`, so the gateway's per-process client cache does not fit it.
A provider without a Batch API (vLLM, Ollama, the simulator with `batches=False`) answers 404
(or 405/501) to `files.create` / `batches.create`: `BatchesUnsupported`, and Parley runs the
lines itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import openai

from . import clients, transport
from .gateway import map_error
from .transport import ProviderTarget, UpstreamError

T = TypeVar("T")
UNSUPPORTED_STATUSES = frozenset({404, 405, 501})


class BatchesUnsupported(Exception):
    """The provider has no Batch API."""


@dataclass(frozen=True)
class ProviderBatch:
    id: str
    status: str
    output_file_id: str | None
    error_file_id: str | None


@dataclass(frozen=True)
class LineAnswer:
    """One request's answer: OpenAI's status code and body (a completion or an error object)."""

    status_code: int
    body: dict[str, Any]


@contextlib.asynccontextmanager
async def _client(target: ProviderTarget) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        api_key=target.api_key or "missing", organization=target.organization or None,
        base_url=target.base_url, timeout=transport.timeout(), max_retries=2,
        # The egress guard and the provider's rate-limit headers, as every provider call.
        http_client=clients.provider_http_client(target, timeout=transport.timeout()),
    )
    try:
        yield client
    finally:
        await client.close()


async def _mapped(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except openai.APIStatusError as error:
        raise map_error(error) from None
    except (openai.APIError, TimeoutError) as error:
        raise map_error(error) from None


async def provider_batch_submit(target: ProviderTarget, *, jsonl: bytes, metadata: dict[str, str] | None) -> str:
    """Upload the lines and create the provider's batch; its id. Raises BatchesUnsupported or
    UpstreamError."""
    async with _client(target) as client:
        try:
            uploaded = await _mapped(lambda: client.files.create(file=("batch.jsonl", jsonl), purpose="batch"))
            created = await _mapped(lambda: client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                metadata=metadata or None,
            ))
        except UpstreamError as error:
            if error.status in UNSUPPORTED_STATUSES:
                raise BatchesUnsupported() from None
            raise
    return created.id


async def provider_batch_retrieve(target: ProviderTarget, batch_id: str) -> ProviderBatch:
    async with _client(target) as client:
        batch = await _mapped(lambda: client.batches.retrieve(batch_id))
    return ProviderBatch(id=batch.id, status=batch.status, output_file_id=batch.output_file_id,
                         error_file_id=batch.error_file_id)


async def provider_batch_cancel(target: ProviderTarget, batch_id: str) -> None:
    async with _client(target) as client:
        await _mapped(lambda: client.batches.cancel(batch_id))


async def provider_file_content(target: ProviderTarget, file_id: str) -> bytes:
    async with _client(target) as client:
        content = await _mapped(lambda: client.files.content(file_id))
    return content.content


async def _completion(client: openai.AsyncOpenAI, body: dict[str, Any]) -> LineAnswer:
    try:
        answer = await client.post("/chat/completions", body=body, cast_to=object)
    except openai.APIStatusError as error:
        detail = error.body if isinstance(error.body, dict) else {"message": str(error.message)[:500]}
        return LineAnswer(status_code=error.status_code, body={"error": detail.get("error", detail)})
    except (openai.APIError, TimeoutError) as error:
        mapped = map_error(error)
        return LineAnswer(status_code=504 if mapped.code == "upstream_timeout" else 502,
                          body={"error": {"message": mapped.message, "type": "server_error", "code": mapped.code}})
    if not isinstance(answer, dict):
        return LineAnswer(status_code=502, body={"error": {"message": "the provider's answer was not a JSON object",
                                                           "type": "server_error", "code": "upstream_error"}})
    return LineAnswer(status_code=200, body=answer)


async def completions_run(target: ProviderTarget, bodies: list[dict[str, Any]], *, concurrency: int) -> list[LineAnswer]:
    """Each body as one non-streamed chat completion, at most `concurrency` at a time, in order.
    A failure is that line's answer (its status and error body), never an exception."""
    limit = asyncio.Semaphore(max(1, concurrency))

    async def one(client: openai.AsyncOpenAI, body: dict[str, Any]) -> LineAnswer:
        async with limit:
            return await _completion(client, {**body, "stream": False})

    async with _client(target) as client:
        return list(await asyncio.gather(*(one(client, body) for body in bodies)))
