"""The provider gateway: one AsyncOpenAI client per credential, streaming, retries, error mapping.

The only module that imports the `openai` SDK. Callers hand in a `ProviderTarget` (plain data,
already decrypted by the caller's service) and get typed stream events back, or an
`UpstreamError` carrying one of the contract's error codes. Timeouts, the client cache and
the retry policy are `llm.transport`'s, shared with the byte relay.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx2
import openai

from . import clients, transport
from .transport import ProviderTarget, UpstreamError


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float | None = None
    user: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def as_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
        }
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        if self.user:
            kwargs["user"] = self.user
        if self.tools:
            kwargs["tools"] = self.tools
            if self.tool_choice is not None:
                kwargs["tool_choice"] = self.tool_choice
            if self.parallel_tool_calls is not None:
                kwargs["parallel_tool_calls"] = self.parallel_tool_calls
        return kwargs


@dataclass(frozen=True)
class TextDelta:
    content: str


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    call_id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True)
class Finish:
    reason: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


StreamEvent = TextDelta | ToolCallDelta | Finish | Usage


# --- clients ------------------------------------------------------------------------------

def _build_client(target: ProviderTarget) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=target.api_key or "missing",
        organization=target.organization or None,
        base_url=target.base_url,
        timeout=transport.timeout(),
        # Retries are ours (transport.with_retries, until the first token); the SDK's would
        # retry invisibly and could not resume a half-read stream anyway.
        max_retries=0,
        http_client=clients.provider_http_client(target, timeout=transport.timeout()),
    )


_clients = transport.ClientCache(_build_client)


def client_for(target: ProviderTarget) -> openai.AsyncOpenAI:
    return _clients.get(target)


# --- errors -------------------------------------------------------------------------------


def map_error(error: BaseException) -> UpstreamError:
    """Turn whatever the SDK or transport raised into an UpstreamError. Messages never echo
    the provider's body: it can quote request data back."""
    if isinstance(error, UpstreamError):
        return error
    if (refused := clients.address_refusal_of(error)) is not None:
        return refused
    if isinstance(error, (openai.APITimeoutError, TimeoutError, httpx2.TimeoutException)):
        return UpstreamError("the model provider timed out", code="upstream_timeout", retryable=True)
    if isinstance(error, openai.APIStatusError):
        status = error.status_code
        headers = error.response.headers if error.response is not None else None
        return transport.provider_refusal(status, f"the model provider answered {status}", headers)
    if isinstance(error, openai.APIConnectionError):
        return UpstreamError("could not reach the model provider", retryable=True)
    return UpstreamError(f"the model provider sent an unusable response ({type(error).__name__})")


# --- streaming ----------------------------------------------------------------------------


def _events_of(chunk: dict[str, Any]) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        if delta:
            if delta.get("content"):
                events.append(TextDelta(delta["content"]))
            for call in delta.get("tool_calls") or ():
                function = call.get("function") or {}
                events.append(
                    ToolCallDelta(
                        index=call.get("index"),
                        call_id=call.get("id"),
                        name=function.get("name"),
                        arguments=function.get("arguments") or "",
                    )
                )
        if choice.get("finish_reason"):
            events.append(Finish(choice["finish_reason"]))
    usage = chunk.get("usage")
    if usage is not None:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        events.append(Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0, cached))
    return events


async def _open(client: openai.AsyncOpenAI, request: ChatRequest) -> tuple[Any, list[StreamEvent]]:
    """Open the stream and read until the first meaningful event (token, tool call or finish)."""
    # The SDK's own request, status-error and in-stream-error handling, but each chunk left as
    # the decoded JSON: building typed chunk models cost ~140 µs a chunk, the most CPU of
    # anything a streamed token costs the web process.
    stream = await client.post(
        "/chat/completions",
        body={**request.as_kwargs(), "stream": True, "stream_options": {"include_usage": True}},
        cast_to=object,
        stream=True,
        stream_cls=openai.AsyncStream[object],
    )
    iterator = stream.__aiter__()
    try:
        while True:
            chunk = await iterator.__anext__()
            events = _events_of(chunk)
            if events:
                return stream, events
    except StopAsyncIteration:
        raise UpstreamError("the model provider closed the stream before answering") from None
    except BaseException:
        await stream.close()
        raise


async def stream_chat(target: ProviderTarget, request: ChatRequest) -> AsyncIterator[StreamEvent]:
    """Stream one chat completion. Retries 429, 5xx, timeouts and connection failures with
    backoff until the first token arrives; after that an error ends the stream."""
    client = client_for(target)

    async def attempt_once() -> tuple[Any, list[StreamEvent]]:
        try:
            async with transport.first_token_deadline():
                return await _open(client, request)
        except Exception as raw:  # noqa: BLE001 — every failure is mapped
            raise map_error(raw) from None

    stream, first_events = await transport.with_retries(attempt_once, target=target)

    finished = False
    try:
        for event in first_events:
            finished = finished or isinstance(event, Finish)
            yield event
        async for chunk in stream:
            for event in _events_of(chunk):
                finished = finished or isinstance(event, Finish)
                yield event
    except UpstreamError:
        raise
    except Exception as raw:  # noqa: BLE001
        raise map_error(raw) from None
    finally:
        await stream.close()
    if not finished:
        raise UpstreamError("the model provider ended the stream early")

