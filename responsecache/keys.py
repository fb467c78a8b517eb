"""What an answer is filed under: the normalised question, the assistant's version, a canonical
`/v1` request, and the packed embedding vectors."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import unicodedata
from typing import Any

# `/v1` body members that do not change the answer: who asks, and how it is delivered.
REQUEST_IGNORED = frozenset({"user", "stream", "stream_options"})


def question_normalised(question: str) -> str:
    """Case folded, punctuation dropped, whitespace collapsed: "What's the  price?" → "whats the price"."""
    kept = "".join(" " if ch.isspace() else ch for ch in question.casefold()
                   if not unicodedata.category(ch).startswith("P"))
    return " ".join(kept.split())


_NUMBER = re.compile(r"\d+(?:[.,:/-]\d+)*")


def question_numbers(question: str) -> tuple[str, ...]:
    """The numbers a question names (an order number, a quantity, a date), in order. Two
    questions that differ in one are different questions however alike their words: an
    embedding barely sees "order 1041" against "order 1042", a customer does."""
    return tuple(_NUMBER.findall(question))


# Function words and the words a question is wrapped in: a paraphrase adds or drops these.
_FILLER = frozenset("""
a about am an and any anything are as at be been but by can could do does doing done for from get
got have has hello help hey hi how i id if im in is it its just know let like me my need of on or
our please should so tell than thank thanks that the their them then there these they this to us
want was way we what whats when where which who why will with would you your
""".split())


def question_terms(question: str) -> frozenset[str]:
    """What a question is about: its words less `_FILLER` and numbers, plurals folded
    ("How can I reset my passwords, please?" → {"reset", "password"})."""
    return frozenset(_singular(word) for word in question_normalised(question).split()
                     if word not in _FILLER and not word.isdigit())


def _singular(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def terms_swapped(terms_a: frozenset[str], terms_b: frozenset[str]) -> bool:
    """Each question (`question_terms`) names something the other does not ("your two keyboard
    plans" against "your two monitor plans"): another thing is asked about, however alike the
    embeddings. A paraphrase that only adds or drops words ("can you tell me how I …,
    please") does not."""
    return bool(terms_a - terms_b) and bool(terms_b - terms_a)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def question_key(question: str) -> str:
    return _digest(question_normalised(question))


def assistant_scope(*, assistant_id: int, version: str) -> str:
    return f"a{assistant_id}.{version}"


def assistant_version(assistant: Any) -> str:
    """A hash of everything that changes an assistant's answer to a first question: editing any
    of it (prompt, model, sampling, output bound, routes, credential) starts a new version."""
    settings = {
        "system_prompt": assistant.system_prompt, "model": assistant.model, "temperature": assistant.temperature,
        "max_tokens": assistant.max_tokens, "routes": assistant.routes, "credential": assistant.credential_id,
        "tools": assistant.tools,
    }
    return _digest(json.dumps(settings, sort_keys=True, default=str))[:32]


def request_key(body: dict[str, Any]) -> str:
    """The canonical JSON of a `/v1` request body, minus what does not change the answer."""
    kept = {name: value for name, value in body.items() if name not in REQUEST_IGNORED}
    return _digest(json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False))


def vector_pack(vector: tuple[float, ...]) -> bytes:
    return struct.pack(f"<{len(vector)}f", *vector)


def vector_unpack(blob: bytes) -> tuple[float, ...]:
    return struct.unpack(f"<{len(blob) // 4}f", blob)


def similarity(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Cosine similarity of two unit vectors; 0 when their dimensions differ (another model's)."""
    if len(a) != len(b):
        return 0.0
    return sum(x * y for x, y in zip(a, b, strict=True))
