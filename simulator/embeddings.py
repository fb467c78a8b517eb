"""``POST /v1/embeddings``: OpenAI's response shape, deterministic vectors where paraphrases are close.

A text's vector is a hashed bag of its content words: lower-cased, stop words (how, do, I, my,
can, the, please…) dropped, crudely stemmed ("passwords", "resetting" → "password", "reset"),
each stem hashed with a sign into ``DIMENSIONS`` slots at weight 1, plus its character
trigrams at a small weight (a typo or another inflection stays near); then L2-normalised.
So "How do I reset my password?" and "how can I reset my passwords please" are the same
vector (cosine 1.0), "I forgot my password, how do I reset it?" is about 0.8 from them, and
a question about opening hours is about 0 from all three. Same text, same vector, always.
Usage counts the input with ``cl100k_base`` (the text-embedding-3 models' encoding).
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

from llm.tokens import count_text

from .errors import ApiError
from .request import json_object

DIMENSIONS = 256
MAX_DIMENSIONS = 3072
TRIGRAM_WEIGHT = 0.15
STOP_WORDS = frozenset(
    "a an and are as at be can could do does did for from have how i if in is it its me my of on "
    "or our please should so that the there this to us was we what whats when where which who why "
    "will with would you your yours i'm hi hello".split()
)
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class EmbeddingRequest:
    model: str
    inputs: list[str]
    dimensions: int
    base64: bool


def parse_embedding_request(raw: bytes) -> EmbeddingRequest:
    """The texts to embed: a string or a non-empty list of strings. Raises ApiError."""
    body = json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or not all(isinstance(item, str) and item for item in inputs):
        raise ApiError(400, "Invalid 'input': expected a non-empty string or array of non-empty strings.",
                       param="input", code="invalid_type")
    dimensions = body.get("dimensions", DIMENSIONS)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= MAX_DIMENSIONS:
        raise ApiError(400, f"'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}.", param="dimensions",
                       code="invalid_value")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format",
                       code="invalid_value")
    return EmbeddingRequest(model=model, inputs=inputs, dimensions=dimensions, base64=encoding == "base64")


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def stems(text: str) -> list[str]:
    words = _WORD.findall(text.lower().replace("'", ""))
    content = [word for word in words if word not in STOP_WORDS]
    return [_stem(word) for word in (content or words)]


def _slot(feature: str, dimensions: int) -> tuple[int, float]:
    digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
    number = int.from_bytes(digest, "little")
    return number % dimensions, 1.0 if number >> 63 else -1.0


def embed(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """The text's unit vector (see the module docstring)."""
    vector = [0.0] * dimensions
    for stem in stems(text):
        slot, sign = _slot("w:" + stem, dimensions)
        vector[slot] += sign
        padded = f"^{stem}$"
        for i in range(len(padded) - 2):
            slot, sign = _slot("t:" + padded[i:i + 3], dimensions)
            vector[slot] += sign * TRIGRAM_WEIGHT
    length = math.sqrt(math.fsum(x * x for x in vector))
    if length == 0:  # nothing to embed but punctuation: one fixed direction
        vector[0], length = 1.0, 1.0
    return [x / length for x in vector]


def embedding_body(request: EmbeddingRequest) -> dict[str, Any]:
    data = []
    for index, text in enumerate(request.inputs):
        vector = embed(text, request.dimensions)
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if request.base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": encoded})
    tokens = sum(count_text(text, "gpt-4") for text in request.inputs)
    return {"object": "list", "data": data, "model": request.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
