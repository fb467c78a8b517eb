"""Prompt-prefix caching as OpenAI documents it: per API key, from 1,024 tokens, in 128-token steps.

The prompt is a token sequence built exactly as ``llm.tokens.count_messages`` counts it: per
message ``TOKENS_PER_MESSAGE`` framing tokens, then the tiktoken encoding of each string field in
the message's key order (role, content — text parts as text, image parts as their bound in
synthetic tokens —, name and its extra token, tool_call_id, and each tool call's name and
arguments), and the reply priming at the end. The framing tokens are synthetic
(negative ids) and the priming repeats a message's opening frame, so a prompt is a prefix of the
next turn's prompt, which appends the assistant's reply and the new user message — as OpenAI
renders ``<|start|>assistant`` at the end of a prompt. Its length is therefore
``prompt_tokens``.

Each prefix at a block boundary (1024, 1152, 1280, … tokens) is hashed incrementally, seeded with
the model and the ``tools`` JSON as sent (tool definitions sit in OpenAI's prefix, so reordering
them is a miss); per key the cache maps those hashes to an expiry. A request's cached tokens are
its longest boundary found unexpired; then every boundary of its prompt is stored (or refreshed)
until ``now + ttl``. O(prompt) per request, and a prompt under 1,024 tokens is never cached.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from llm.tokens import (
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    TOKENS_REPLY_PRIMING,
    encoding_name_for_model,
    encoding_named,
    image_tokens_bound,
)

CACHE_MIN_TOKENS = 1024
CACHE_STEP = 128
DEFAULT_TTL_S = 300.0
MAX_ENTRIES_PER_KEY = 200_000  # a bound on memory; the oldest go first
_FRAME = tuple(-1 - i for i in range(max(TOKENS_PER_MESSAGE, TOKENS_REPLY_PRIMING)))
MESSAGE_FRAME = _FRAME[:TOKENS_PER_MESSAGE]
REPLY_PRIMING = _FRAME[:TOKENS_REPLY_PRIMING]
NAME_MARK = (-100,) * TOKENS_PER_NAME
IMAGE_MARK = (-200,)


def prompt_token_sequence(messages: Iterable[Mapping[str, Any]], model: str) -> list[int]:
    """The prompt as tokens; ``len()`` equals ``count_messages(messages, model)``."""
    encoding = encoding_name_for_model(model)
    tokens: list[int] = []
    for message in messages:
        tokens += MESSAGE_FRAME
        for key, value in message.items():
            if value is None:
                continue
            if key == "tool_calls":
                for call in value:
                    function = call.get("function", {})
                    tokens += _encode(encoding, function.get("name", ""))
                    tokens += _encode(encoding, function.get("arguments", ""))
            elif key == "content" and isinstance(value, list):
                tokens += _parts(encoding, value, model)
            elif isinstance(value, str):
                tokens += _encode(encoding, value)
                if key == "name":
                    tokens += NAME_MARK
            else:  # other structures count at their JSON length, as count_messages does
                tokens += _encode(encoding, json.dumps(value, sort_keys=True, separators=(",", ":")))
    tokens += REPLY_PRIMING
    return tokens


def _parts(encoding: str, parts: list[Any], model: str) -> list[int]:
    """Text parts as their tokens, an image part as its bound in synthetic tokens."""
    tokens: list[int] = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal") and isinstance(part.get(kind), str):
            tokens += _encode(encoding, part[kind])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict):
            tokens += IMAGE_MARK * image_tokens_bound(model, part["image_url"].get("detail"))
    return tokens


@lru_cache(maxsize=8192)
def _encode(encoding: str, text: str) -> tuple[int, ...]:
    # Every turn resends the whole conversation: remembering each message's tokens keeps the
    # simulator's cost per request near the size of what is new.
    return tuple(encoding_named(encoding).encode(text, disallowed_special=()))


def cache_namespace(model: str, tools: list[dict[str, Any]] | None) -> bytes:
    return hashlib.sha256(json.dumps([model, tools]).encode()).digest()


def boundary_digests(namespace: bytes, tokens: Sequence[int]) -> list[bytes]:
    """Digest of ``tokens[:b]`` for b = 1024, 1152, … up to ``len(tokens)``."""
    if len(tokens) < CACHE_MIN_TOKENS:
        return []
    data = memoryview(array("q", tokens).tobytes())
    width = array("q").itemsize  # bytes per token
    digest = hashlib.blake2b(namespace, digest_size=16)
    digest.update(data[: CACHE_MIN_TOKENS * width])
    digests = [digest.digest()]
    for start in range(CACHE_MIN_TOKENS, len(tokens) - CACHE_STEP + 1, CACHE_STEP):
        digest.update(data[start * width:(start + CACHE_STEP) * width])
        digests.append(digest.digest())
    return digests


def cached_tokens_at(boundary_index: int) -> int:
    """Tokens covered by the boundary at this index of ``boundary_digests``."""
    return CACHE_MIN_TOKENS + boundary_index * CACHE_STEP


class PromptCache:
    """Per key: prefix digest → expiry, in expiry order (each write moves an entry to the end)."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._keys: dict[str, OrderedDict[bytes, float]] = {}
        self._lock = threading.Lock()  # tests clear it from their own thread

    def use(self, key: str, namespace: bytes, tokens: Sequence[int]) -> int:
        """Cached tokens of this prompt for this key; then the prompt is cached (refreshed)."""
        digests = boundary_digests(namespace, tokens)
        if not digests:
            return 0
        now = self._clock()
        with self._lock:
            entries = self._keys.setdefault(key, OrderedDict())
            while entries and next(iter(entries.values())) <= now:
                entries.popitem(last=False)
            hits = [i for i, digest in enumerate(digests) if digest in entries]
            for digest in digests:
                entries[digest] = now + self.ttl_s
                entries.move_to_end(digest)
            while len(entries) > MAX_ENTRIES_PER_KEY:
                entries.popitem(last=False)
        return cached_tokens_at(hits[-1]) if hits else 0

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()
