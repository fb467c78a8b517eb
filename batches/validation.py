"""A batch input file, checked line by line at submit: JSON, method, url, body shape, a priced
model the key may use, a countable prompt, at most BATCH_MAX_LINES lines."""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.conf import settings

from billing.metering import worst_case_cost
from billing.services import Price, PriceMissing, price_for
from llm.tokens import UncountableContent, count_request_prompt

ENDPOINT = "/v1/chat/completions"
MAX_OUTPUT_TOKENS = 2**31 - 1
MAX_CUSTOM_ID = 512
MAX_ERRORS_SHOWN = 5


class InvalidBatch(Exception):
    """A request about batches or files that cannot be served; `param` names the field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


@dataclass(frozen=True)
class Line:
    index: int
    custom_id: str
    model: str
    body: dict[str, Any]  # as sent upstream: `max_tokens` added when the line gave none
    price: Price
    prompt_tokens: int
    max_output: int

    def worst_case(self, *, batch_priced: bool) -> Decimal:
        price = self.price.batch() if batch_priced else self.price
        return worst_case_cost(price=price, prompt_tokens=self.prompt_tokens, max_tokens=self.max_output)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _positive_int(body: dict[str, Any], name: str, most: int = MAX_OUTPUT_TOKENS) -> None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most):
        raise ValueError(f"'body.{name}' must be an integer from 1 to {most}")


def _body_check(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ValueError("'body' must be an object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ValueError("'body.model' is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("'body.messages' must be a non-empty array of message objects")
    if body.get("stream"):
        raise ValueError("'body.stream' is not supported in a batch")
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    _positive_int(body, "n", most=128)
    return body


def _line(index: int, raw: str, *, allowed_models: list[str], seen: set[str], tenant_id: int) -> Line:
    try:
        item = json.loads(raw, parse_constant=_reject_constant)
    except ValueError as error:
        raise ValueError(f"not valid JSON ({error})") from None
    if not isinstance(item, dict):
        raise ValueError("a line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        raise ValueError(f"'custom_id' must be a non-empty string of at most {MAX_CUSTOM_ID} characters")
    if custom_id in seen:
        raise ValueError(f"'custom_id' {custom_id!r} is not unique in the file")
    if item.get("method") != "POST":
        raise ValueError("'method' must be \"POST\"")
    if item.get("url") != ENDPOINT:
        raise ValueError(f"'url' must be {ENDPOINT!r}")
    body = dict(_body_check(item.get("body")))
    model = body["model"]
    if allowed_models and model not in allowed_models:
        raise ValueError(f"the model {model!r} is not available to this API key")
    try:
        price = price_for(model, tenant_id=tenant_id)
        prompt_tokens = count_request_prompt(body, model)
    except PriceMissing:
        raise ValueError(f"the model {model!r} has no price") from None
    except UncountableContent as error:
        raise ValueError(str(error)) from None
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = settings.BATCH_DEFAULT_MAX_TOKENS
    largest = max(body.get(name) or 0 for name in ("max_tokens", "max_completion_tokens"))
    seen.add(custom_id)
    return Line(index=index, custom_id=custom_id, model=model, body=body, price=price,
                prompt_tokens=prompt_tokens, max_output=largest * (body.get("n") or 1))


def lines_parse(content: bytes, *, allowed_models: list[str], tenant_id: int) -> list[Line]:
    """Every line of a batch input file, checked. Raises InvalidBatch naming the first bad lines."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidBatch("the input file is not UTF-8", param="input_file_id", code="invalid_file") from None
    raws = [(number, raw) for number, raw in enumerate(text.splitlines(), start=1) if raw.strip()]
    if not raws:
        raise InvalidBatch("the input file has no lines", param="input_file_id", code="invalid_file")
    if len(raws) > settings.BATCH_MAX_LINES:
        raise InvalidBatch(f"the input file has {len(raws)} lines; at most {settings.BATCH_MAX_LINES} are allowed",
                           param="input_file_id", code="invalid_file")
    lines, problems, seen = [], [], set()
    for index, (number, raw) in enumerate(raws):
        try:
            lines.append(_line(index, raw, allowed_models=allowed_models, seen=seen, tenant_id=tenant_id))
        except ValueError as error:
            problems.append(f"line {number}: {error}")
    if problems:
        shown = "; ".join(problems[:MAX_ERRORS_SHOWN])
        more = f" (and {len(problems) - MAX_ERRORS_SHOWN} more)" if len(problems) > MAX_ERRORS_SHOWN else ""
        raise InvalidBatch(f"the input file is invalid: {shown}{more}", param="input_file_id", code="invalid_file")
    return lines


def metadata_check(metadata: Any) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 string pairs, keys up to 64 and values up to 512 characters."""
    if metadata is None:
        return None
    if (not isinstance(metadata, dict) or len(metadata) > 16
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                       for k, v in metadata.items())):
        raise InvalidBatch("'metadata' must be at most 16 string pairs (keys up to 64, values up to 512 characters)",
                           param="metadata")
    return metadata


