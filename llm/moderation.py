"""The provider's moderation endpoint (`POST /v1/moderations`): one call, flagged categories back.

With `llm/gateway.py`, the only module that imports the `openai` SDK. It reuses the gateway's
per-credential client and error mapping, and knows nothing of policies or billing: callers
pass the categories that count and bill the call themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from .gateway import ProviderTarget, client_for, map_error

MODERATION_MODEL = "omni-moderation-latest"

# The categories of OpenAI's omni moderation model, as the API names them.
OMNI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)


@dataclass(frozen=True)
class ProviderVerdict:
    """Per input, in order, the flagged categories that count (empty: that input passed)."""

    model: str
    results: tuple[frozenset[str], ...]

    @property
    def flagged(self) -> bool:
        return any(self.results)

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(sorted(frozenset().union(*self.results)))


def _counted(result: Any, categories: Collection[str]) -> frozenset[str]:
    flagged = {name for name, on in result.categories.model_dump(by_alias=True).items() if on}
    if categories:
        return frozenset(flagged & set(categories))
    if result.flagged and not flagged:  # flagged overall without naming a category
        return frozenset({"flagged"})
    return frozenset(flagged)


async def provider_check(
    *, target: ProviderTarget, texts: list[str], categories: Collection[str] = ()
) -> ProviderVerdict:
    """Classify `texts` in one call. `categories` limits what counts (empty: any flagged
    category). No retries: a retry would be a second billed call, and callers fail open.
    The whole call is bounded by UPSTREAM_FIRST_TOKEN_TIMEOUT (the answer is its first byte).
    Raises UpstreamError."""
    if not texts:
        raise ValueError("provider_check needs at least one text")
    client = client_for(target)
    try:
        async with asyncio.timeout(settings.UPSTREAM_FIRST_TOKEN_TIMEOUT):
            response = await client.moderations.create(model=MODERATION_MODEL, input=texts)
        if len(response.results) != len(texts):
            raise ValueError("one moderation result per input was expected")
        results = tuple(_counted(result, categories) for result in response.results)
    except Exception as raw:  # noqa: BLE001 — every failure is mapped
        raise map_error(raw) from None
    return ProviderVerdict(model=response.model or MODERATION_MODEL, results=results)
