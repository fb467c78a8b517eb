"""A byte relay to an OpenAI-compatible upstream, for the OpenAI-compatible endpoint.

Trade-off (versus `gateway.stream_chat`, which parses every chunk through the SDK): this module
speaks HTTP to `{base_url}/chat/completions` with httpx2 directly — the transport the `openai`
SDK itself uses — and hands the upstream's bytes back unchanged. It parses exactly one event
of a stream (the one carrying `usage`), and no request parameter goes through the SDK's typed
transforms, so whatever the caller sent (`tools`, `response_format`, future fields) reaches the
provider as sent. Measured on this kind of machine, re-parsing and re-serialising every chunk
through the SDK roughly doubles the time a proxy adds to the first token. What we give up is
the SDK's own request building and error classes: the few headers are set here, and failures
are mapped to `UpstreamError` below; timeouts, the client cache and the retry policy (429,
5xx, timeouts and connection failures, before the first byte only) are `llm.transport`'s,
the same as the gateway's.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx2

from . import clients, transport
from .gateway import Usage
from .transport import ProviderTarget, UpstreamError

DONE_EVENT = b"data: [DONE]"
# Earlier chunks carry `"usage":null` once include_usage is on; only a real object is parsed.
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
# Echoed to the caller: their own request is what a provider's 4xx message talks about.
CALLER_FAULT_STATUSES = frozenset({400, 404, 413, 422})

def _build_client(target: ProviderTarget) -> httpx2.AsyncClient:
    headers = {"Authorization": f"Bearer {target.api_key or 'missing'}", "Content-Type": "application/json"}
    if target.organization:
        headers["OpenAI-Organization"] = target.organization
    return clients.provider_http_client(
        target,
        base_url=target.base_url.rstrip("/") + "/",
        headers=headers,
        timeout=transport.timeout(),
        limits=httpx2.Limits(max_connections=None, max_keepalive_connections=100),
    )


_clients = transport.ClientCache(_build_client)


# --- errors -------------------------------------------------------------------------------


def _provider_message(body: bytes) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return ""
    return str(message)[:500] if message else ""


def status_error(response: httpx2.Response, body: bytes) -> UpstreamError:
    status = response.status_code
    message = f"the model provider answered {status}"
    if status in CALLER_FAULT_STATUSES:
        detail = _provider_message(body)
        message = f"{message}: {detail}" if detail else message
    return transport.provider_refusal(status, message, response.headers)


def transport_error(error: BaseException) -> UpstreamError:
    if isinstance(error, UpstreamError):
        return error
    if (refused := clients.address_refusal_of(error)) is not None:
        return refused
    if isinstance(error, (TimeoutError, httpx2.TimeoutException)):
        return UpstreamError("the model provider timed out", code="upstream_timeout", retryable=True)
    if isinstance(error, httpx2.TransportError):
        return UpstreamError("could not reach the model provider", retryable=True)
    return UpstreamError(f"the model provider sent an unusable response ({type(error).__name__})")


# --- calls --------------------------------------------------------------------------------


async def _send(target: ProviderTarget, body: bytes, *, stream: bool) -> httpx2.Response:
    """One attempt: the response with its headers read (and, when not streaming, its body);
    raises UpstreamError for a non-2xx answer or a transport failure."""
    client = _clients.get(target)
    request = client.build_request(
        "POST", "chat/completions", content=body, headers={"Accept-Encoding": "identity"} if stream else None
    )
    try:
        # Providers send the headers with the first token: this bounds the wait for it.
        async with transport.first_token_deadline():
            response = await client.send(request, stream=True)
        if response.status_code >= 400 or not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
    except Exception as raw:  # noqa: BLE001 — every failure is mapped
        raise transport_error(raw) from None
    if response.status_code >= 400:
        raise status_error(response, response.content)
    return response


async def _with_retries(target: ProviderTarget, body: bytes, *, stream: bool) -> httpx2.Response:
    return await transport.with_retries(lambda: _send(target, body, stream=stream), target=target)


@dataclass(frozen=True)
class Completion:
    """A whole non-streamed answer: the upstream's bytes and the usage read from them."""

    body: bytes
    content_type: str
    usage: Usage | None
    content: str  # for counting when the provider sent no usage


async def complete(target: ProviderTarget, body: bytes) -> Completion:
    response = await _with_retries(target, body, stream=False)
    try:
        payload = json.loads(response.content)
    except ValueError:
        raise UpstreamError("the model provider sent an unusable response (not JSON)") from None
    content = "".join(
        str((choice.get("message") or {}).get("content") or "") for choice in payload.get("choices") or ()
    )
    return Completion(
        body=response.content,
        content_type=response.headers.get("content-type", "application/json"),
        usage=usage_of(payload.get("usage")),
        content=content,
    )


def usage_of(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    details = raw.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0,
    )


@dataclass
class StreamRelay:
    """An open upstream stream, relayed event by event.

    Bytes go through untouched except: the `choices: []` usage event is dropped when the caller
    did not ask for usage (we always ask upstream), and `[DONE]` is held back by the caller
    until usage is written, so a client that has read `[DONE]` finds the call billed."""

    response: httpx2.Response
    forward_usage: bool
    usage: Usage | None = None
    done: bool = False
    events: list[bytes] = field(default_factory=list)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Complete events (each ending in a blank line), batched per upstream read, up to but
        not including `[DONE]`. Raises UpstreamError when the stream breaks."""
        buffer = b""
        try:
            async for data in self.response.aiter_bytes():
                if b"\r" in data:
                    data = data.replace(b"\r\n", b"\n")
                buffer += data
                if b"\n\n" not in buffer:
                    continue
                *complete_events, buffer = buffer.split(b"\n\n")
                out = self._relay(complete_events)
                if out:
                    yield out
                if self.done:
                    return
        except UpstreamError:
            raise
        except Exception as raw:  # noqa: BLE001
            raise transport_error(raw) from None

    def _relay(self, raw_events: list[bytes]) -> bytes:
        out: list[bytes] = []
        for event in raw_events:
            if not event.strip():
                continue
            if event.startswith(DONE_EVENT) or event.startswith(b"data:[DONE]"):
                self.done = True
                break
            self.events.append(event)
            if _USAGE_OBJECT.search(event) and self._take_usage(event):
                continue
            if not self.forward_usage:
                event = event.replace(b',"usage":null', b"")
            out.append(event)
            out.append(b"\n\n")
        return b"".join(out)

    def _take_usage(self, event: bytes) -> bool:
        """Record the usage; True when the event should be dropped (usage-only, not wanted)."""
        try:
            payload = json.loads(event.partition(b":")[2])
        except ValueError:
            return False
        usage = usage_of(payload.get("usage")) if isinstance(payload, dict) else None
        if usage is None:
            return False
        self.usage = usage
        return not self.forward_usage and not payload.get("choices")

    def streamed_content(self) -> str:
        """The text streamed so far (tool-call arguments included), parsed only when needed."""
        parts: list[str] = []
        for event in self.events:
            for delta in event_deltas(event):
                parts.append(str(delta.get("content") or ""))
                for call in delta.get("tool_calls") or ():
                    parts.append(str((call.get("function") or {}).get("arguments") or ""))
        return "".join(parts)

    async def aclose(self) -> None:
        await self.response.aclose()


def event_deltas(event: bytes) -> list[dict[str, Any]]:
    """The `delta` of every choice in one streamed event (`data: {…}`); [] for anything else."""
    try:
        payload = json.loads(event.partition(b":")[2])
    except ValueError:
        return []
    choices = payload.get("choices") if isinstance(payload, dict) else None
    return [choice.get("delta") or {} for choice in choices or () if isinstance(choice, dict)]


async def open_stream(target: ProviderTarget, body: bytes, *, forward_usage: bool) -> StreamRelay:
    """Send a streamed request (body already carries `stream` and `include_usage`) and return
    once the upstream answered 2xx headers; retries before that as the gateway does."""
    response = await _with_retries(target, body, stream=True)
    return StreamRelay(response=response, forward_usage=forward_usage)
