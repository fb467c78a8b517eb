"""Provider connection checks: list the provider's models with a credential (the admin's "test connection")."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import openai

from .clients import provider_http_client
from .gateway import ProviderTarget, map_error

PROBE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class ProbeResult:
    credential_id: int
    ok: bool
    detail: str  # safe to show: never the key, never the provider's body


async def provider_probe(target: ProviderTarget, *, timeout: float = PROBE_TIMEOUT_SECONDS) -> ProbeResult:
    """`GET {base_url}/models` with the target's key; one attempt, bounded in time."""
    client = openai.AsyncOpenAI(
        api_key=target.api_key or "missing",
        organization=target.organization or None,
        base_url=target.base_url,
        timeout=timeout,
        max_retries=0,
        http_client=provider_http_client(target, timeout=timeout),
    )
    try:
        async with client:
            page = await client.models.list()
    except Exception as error:  # every failure is a result to report, not a crash
        return ProbeResult(target.credential_id, False, map_error(error).message)
    names = sorted(model.id for model in page.data)
    shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
    return ProbeResult(target.credential_id, True, f"{len(names)} models available ({shown})")


def providers_probe(targets: Sequence[ProviderTarget]) -> list[ProbeResult]:
    """Probe several credentials concurrently, from synchronous code (an admin action)."""

    async def run() -> list[ProbeResult]:
        return list(await asyncio.gather(*(provider_probe(target) for target in targets)))

    return asyncio.run(run()) if targets else []
