"""``POST /v1/moderations``: OpenAI's response shape, flagged by documented trigger words.

A trigger is a whole word (case-insensitive; letters, digits and hyphens around it break the
match, so "skill" and "kills" are not "kill"). It flags its category and the category's parent;
a flagged category scores 0.99, every other one 0.001.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from .errors import ApiError
from .request import json_object

MODERATION_MODEL = "omni-moderation-latest"
CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)
# The categories OpenAI's omni model also judges in images (the others are text only).
IMAGE_CATEGORIES = frozenset({"self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
                              "violence", "violence/graphic"})
TRIGGERS: dict[str, tuple[str, ...]] = {
    "harass-word": ("harassment",),
    "threaten-word": ("harassment", "harassment/threatening"),
    "hate-word": ("hate",),
    "hatethreat-word": ("hate", "hate/threatening"),
    "illicit-word": ("illicit",),
    "weapon-word": ("illicit", "illicit/violent"),
    "selfharm-word": ("self-harm",),
    "selfharm-intent-word": ("self-harm", "self-harm/intent"),
    "selfharm-howto-word": ("self-harm", "self-harm/instructions"),
    "sexual-word": ("sexual",),
    "minors-word": ("sexual", "sexual/minors"),
    "kill": ("violence",),
    "violence-word": ("violence",),
    "gore-word": ("violence", "violence/graphic"),
}
FLAGGED_SCORE = 0.99
CLEAR_SCORE = 0.001
_TRIGGER = re.compile(
    r"(?<![\w-])(" + "|".join(re.escape(word) for word in sorted(TRIGGERS, key=len, reverse=True))
    + r")(?![\w-])", re.IGNORECASE)


@dataclass(frozen=True)
class ModerationInput:
    text: str
    has_text: bool
    has_image: bool


@dataclass(frozen=True)
class ModerationRequest:
    body: dict[str, Any]
    model: str
    inputs: list[ModerationInput]


def parse_moderation_request(raw: bytes) -> ModerationRequest:
    """The inputs to judge: a string, a list of strings (one result each), or a list of text /
    image_url parts (one result). Raises ApiError."""
    body = json_object(raw)
    model = body.get("model", MODERATION_MODEL)
    if not isinstance(model, str) or not model:
        raise ApiError(400, "Invalid type for 'model': expected a string.", param="model",
                       code="invalid_type")
    return ModerationRequest(body, model, _inputs(body.get("input")))


def _inputs(value: Any) -> list[ModerationInput]:
    if value is None:
        raise ApiError(400, "Missing required parameter: 'input'.", param="input",
                       code="missing_required_parameter")
    if isinstance(value, str):
        return [ModerationInput(value, True, False)]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return [ModerationInput(item, True, False) for item in value]
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        return [_multimodal(value)]
    raise ApiError(400, "Invalid 'input': expected a string, an array of strings or an array of "
                        "content parts.", param="input", code="invalid_type")


def _multimodal(parts: list[dict[str, Any]]) -> ModerationInput:
    for i, part in enumerate(parts):
        if part.get("type") not in ("text", "image_url"):
            raise ApiError(400, f"Invalid value: {part.get('type')!r}. Supported values are: "
                                "'text' and 'image_url'.", param=f"input[{i}].type",
                           code="invalid_value")
    texts = [str(part.get("text", "")) for part in parts if part["type"] == "text"]
    return ModerationInput(" ".join(texts), bool(texts),
                           any(part["type"] == "image_url" for part in parts))


def flagged_categories(text: str) -> set[str]:
    return {category for word in _TRIGGER.findall(text) for category in TRIGGERS[word.lower()]}


def moderation_result(item: ModerationInput) -> dict[str, Any]:
    flagged = flagged_categories(item.text)
    return {
        "flagged": bool(flagged),
        "categories": {category: category in flagged for category in CATEGORIES},
        "category_scores": {category: FLAGGED_SCORE if category in flagged else CLEAR_SCORE
                            for category in CATEGORIES},
        "category_applied_input_types": {
            category: ["text"] * item.has_text + ["image"] * (
                item.has_image and category in IMAGE_CATEGORIES)
            for category in CATEGORIES},
    }


def moderation_body(request: ModerationRequest) -> dict[str, Any]:
    """OpenAI's answer; like it, no ``usage``."""
    return {"id": f"modr-{uuid.uuid4().hex}", "model": request.model,
            "results": [moderation_result(item) for item in request.inputs]}
