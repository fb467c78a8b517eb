"""The provider's embeddings endpoint (`POST /v1/embeddings`): one text in, one vector out.

With `gateway.py` and `moderation.py`, a module that imports the `openai` SDK (through the
gateway's per-credential client and error mapping). It knows nothing of caching or billing:
the caller holds and books the call (the response cache, `responsecache/semantic.py`).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from django.conf import settings

from .gateway import ProviderTarget, client_for, map_error


@dataclass(frozen=True)
class Embedding:
    model: str
    vector: tuple[float, ...]  # L2-normalised here, whatever the provider sent
    prompt_tokens: int | None  # the provider's count; None when it sent no usage


def normalised(vector: list[float]) -> tuple[float, ...]:
    """The vector scaled to length 1 (cosine similarity is then a dot product). Raises ValueError."""
    length = math.sqrt(math.fsum(x * x for x in vector))
    if not vector or not math.isfinite(length) or length == 0:
        raise ValueError("the provider sent an empty or zero embedding")
    return tuple(x / length for x in vector)


async def provider_embed(*, target: ProviderTarget, model: str, text: str) -> Embedding:
    """Embed `text` in one call. No retries: a retry would be a second billed call, and the
    caller treats a failure as a cache miss. Bounded by UPSTREAM_FIRST_TOKEN_TIMEOUT.
    Raises UpstreamError."""
    client = client_for(target)
    try:
        async with asyncio.timeout(settings.UPSTREAM_FIRST_TOKEN_TIMEOUT):
            response = await client.embeddings.create(model=model, input=text, encoding_format="float")
        if len(response.data) != 1:
            raise ValueError("one embedding per input was expected")
        vector = normalised([float(x) for x in response.data[0].embedding])
    except Exception as raw:  # noqa: BLE001 — every failure is mapped
        raise map_error(raw) from None
    usage = response.usage
    return Embedding(model=response.model or model, vector=vector, prompt_tokens=usage.prompt_tokens if usage else None)
