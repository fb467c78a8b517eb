"""The HTTP client under every provider call (the SDK's and the relay's alike).

Two things every provider connection needs and no URL check at save time can give: it connects
only where the egress rule for providers allows (`tenants.egress`, checked on the resolved
address of every new connection, so a name re-pointed at 10.0.0.5 after the credential was saved
is refused), and every answer's `x-ratelimit-*` and Retry-After headers reach `llm.pacing`.
"""

from __future__ import annotations

from typing import Any

import httpcore2
import httpx2

from tenants.egress import AddressRefused, GuardedBackend, provider_rule

from . import pacing, transport
from .transport import ProviderTarget, UpstreamError

DEFAULT_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)


class GuardedTransport(httpx2.AsyncHTTPTransport):
    """httpx's own transport (request mapping, error mapping), over a guarded connection pool."""

    def __init__(self, *, limits: httpx2.Limits) -> None:
        # No proxies from the environment: a proxy would resolve and connect where the guard
        # cannot see.
        super().__init__(limits=limits, trust_env=False)
        # httpx builds its pool without a network-backend hook, so it is rebuilt here with the
        # same settings plus the guard (httpx2 is pinned; tests/test_provider_egress.py fails
        # if a provider call ever reaches a refused address).
        pool = self._pool
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=pool._ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=GuardedBackend(provider_rule),
        )


def provider_http_client(target: ProviderTarget, *, limits: httpx2.Limits = DEFAULT_LIMITS, **options: Any) -> httpx2.AsyncClient:
    key = pacing.pacing_key(target.base_url, target.api_key)

    async def observe(response: httpx2.Response) -> None:
        pacing.observe(
            key, response.headers, status=response.status_code, retry_after=transport.retry_after(response.headers)
        )

    return httpx2.AsyncClient(
        transport=GuardedTransport(limits=limits), event_hooks={"response": [observe]}, **options
    )


def address_refusal_of(error: BaseException) -> UpstreamError | None:
    """A failure caused by the egress guard, as a clear, non-retryable error (the SDK and httpx
    wrap it in their connection errors)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, AddressRefused):
            return UpstreamError(f"the provider URL is refused: {seen}")
        seen = seen.__cause__ or seen.__context__
    return None
