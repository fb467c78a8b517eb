"""Tenant webhook tools: the one place Parley makes outbound webhook calls.

Each call is a POST of a JSON body

    {"tool": NAME, "arguments": {...}, "conversation_id": UUID|null, "end_user": EXTERNAL_ID|null,
     "call_id": STR}

with `Content-Type: application/json` and two headers:

    X-Parley-Timestamp: 1767225600                 (unix seconds when the call was made)
    X-Parley-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>

How the tenant verifies a call (compute over the raw body bytes, before parsing them):

    import hashlib, hmac, time

    def parley_call_verified(secret: str, headers, body: bytes, tolerance: int = 300) -> bool:
        timestamp = headers["X-Parley-Timestamp"]
        if abs(time.time() - int(timestamp)) > tolerance:        # too old: a replay
            return False
        signed = timestamp.encode() + b"." + body
        expected = "v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        return any(hmac.compare_digest(expected, given.strip())
                   for given in headers["X-Parley-Signature"].split(","))

To refuse replays inside the tolerance window too, remember each `call_id` for that long.

The answer must be 2xx with a JSON body (`application/json` or `application/*+json`), at most
64 KiB; it becomes the tool result the model reads. Anything else — a timeout, a refused
address, another status, another content type, unparseable or oversized JSON — is a tool error
the model reads instead. Redirects are not followed. Calls connect only to addresses the
private-address guard allows (see `tenants.egress`), over https unless `DEBUG` or
`TOOLS_WEBHOOK_ALLOW_HTTP` is set.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpcore2
import httpx2
from django.conf import settings

from tenants.egress import AddressRefused, GuardedBackend, webhook_rule

from .calls import ToolContext, ToolError

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "Parley-Webhook/1"


class WebhookFailed(ToolError):
    """A webhook call that produced no usable result; the message is for the model."""


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    secret: str = field(repr=False)
    timeout_seconds: float


def http_allowed() -> bool:
    return bool(settings.DEBUG or getattr(settings, "TOOLS_WEBHOOK_ALLOW_HTTP", False))


def url_refusal(url: str) -> str | None:
    """Why `url` may not be called (scheme, missing host), or None. Addresses are checked at
    connect time, not here."""
    try:
        parsed = httpx2.URL(url)
    except Exception:  # noqa: BLE001 — any parse failure is an unusable URL
        return "the webhook URL is not a valid URL"
    if parsed.scheme not in ("http", "https"):
        return "the webhook URL must use https"
    if parsed.scheme == "http" and not http_allowed():
        return "the webhook URL must use https"
    if not parsed.host:
        return "the webhook URL has no host"
    if parsed.userinfo:
        return "the webhook URL must not carry credentials"
    return None


def webhook_signature(*, secret: str, timestamp: int | str, body: bytes) -> str:
    signed = str(timestamp).encode() + b"." + body
    return "v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def webhook_body(*, name: str, arguments: dict[str, Any], context: ToolContext, call_id: str) -> bytes:
    payload = {
        "tool": name,
        "arguments": arguments,
        "conversation_id": str(context.conversation_id) if context.conversation_id is not None else None,
        "end_user": context.end_user_external_id,
        "call_id": call_id,
    }
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


async def webhook_call(
    *, target: WebhookTarget, name: str, arguments: dict[str, Any], context: ToolContext, call_id: str
) -> Any:
    """POST one signed call and return the parsed JSON answer. Raises WebhookFailed."""
    refusal = url_refusal(target.url)
    if refusal is not None:
        raise WebhookFailed(refusal)
    body = webhook_body(name=name, arguments=arguments, context=context, call_id=call_id)
    timestamp = int(time.time())
    headers = [
        # Explicit, so an IPv6 literal keeps its brackets; the connection goes to a checked IP.
        (b"Host", httpx2.URL(target.url).netloc),
        (b"Content-Type", b"application/json"),
        (b"Accept", b"application/json"),
        (b"User-Agent", USER_AGENT.encode()),
        (b"X-Parley-Timestamp", str(timestamp).encode()),
        (b"X-Parley-Signature", webhook_signature(secret=target.secret, timestamp=timestamp, body=body).encode()),
    ]
    try:
        raw = await _post(target, headers, body)
    except AddressRefused as error:
        logger.warning("webhook %s refused: %s", name, error)
        raise WebhookFailed(f"the webhook URL is refused: {error}") from None
    except httpcore2.TimeoutException:
        raise WebhookFailed(f"the webhook did not answer within {target.timeout_seconds:g} s") from None
    except httpcore2.ConnectError:
        raise WebhookFailed("could not connect to the webhook") from None
    except (httpcore2.NetworkError, httpcore2.ProtocolError) as error:
        raise WebhookFailed(f"the webhook connection failed ({type(error).__name__})") from None
    try:
        return json.loads(raw)
    except ValueError:
        raise WebhookFailed("the webhook answered with invalid JSON") from None


async def _post(target: WebhookTarget, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    url = httpx2.URL(target.url)
    timeout = float(target.timeout_seconds)
    # A pool per call: every call resolves and checks the host afresh, and no connection
    # outlives the event loop that made it. Webhook calls are rare next to tokens.
    async with httpcore2.AsyncConnectionPool(network_backend=GuardedBackend(webhook_rule), retries=0) as pool:
        async with pool.stream(
            "POST",
            httpcore2.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=headers,
            content=body,
            extensions={"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}},
        ) as response:
            _check_head(response)
            return await _read_capped(response)


def _header(response: httpcore2.Response, name: bytes) -> str:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return ""


def _check_head(response: httpcore2.Response) -> None:
    if not 200 <= response.status < 300:
        raise WebhookFailed(f"the webhook answered HTTP {response.status}")
    media_type = _header(response, b"content-type").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (media_type.startswith("application/") and media_type.endswith("+json")):
        raise WebhookFailed(f"the webhook answered with {media_type or 'no content type'}, not application/json")
    declared = _header(response, b"content-length")
    if declared.isdigit() and int(declared) > MAX_RESPONSE_BYTES:
        raise WebhookFailed(f"the webhook answer is larger than {MAX_RESPONSE_BYTES} bytes")


async def _read_capped(response: httpcore2.Response) -> bytes:
    received = bytearray()
    async for chunk in response.aiter_stream():
        received += chunk
        if len(received) > MAX_RESPONSE_BYTES:
            # Leaving the stream closes the connection: the rest is never read.
            raise WebhookFailed(f"the webhook answer is larger than {MAX_RESPONSE_BYTES} bytes")
    return bytes(received)
