"""Tool names, parameter schemas and the arguments a model sends, checked with JSON Schema 2020-12.

Arguments are checked strictly, whatever the schema says: an object schema that does not set
`additionalProperties` gets `additionalProperties: false` (the model must not invent arguments a
tool would silently ignore or, worse, pass on). The strict copy is also what the model is shown.
Branches of `allOf` are left alone: each branch would refuse the others' properties.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError

TOOL_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# Schemas travel in every request's prompt prefix: keep them to a reasonable size.
MAX_SCHEMA_CHARS = 16_000
MAX_ARGUMENTS_CHARS = 64_000
# The model gets a handful of precise complaints, not a wall of them.
MAX_REPORTED_ERRORS = 5

_COMBINATORS_KEPT = ("anyOf", "oneOf")


class ArgumentsInvalid(Exception):
    """Arguments the tool must not run with; the message is written for the model.
    `arguments` is the parsed object when the text was a JSON object, else None."""

    def __init__(self, message: str, arguments: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.arguments = arguments


class SchemaInvalid(Exception):
    """A parameters schema that cannot describe a tool's arguments."""


def schema_check(schema: Any) -> None:
    """Raise SchemaInvalid unless `schema` is a valid 2020-12 schema for an arguments object."""
    if not isinstance(schema, dict):
        raise SchemaInvalid("the parameters schema must be a JSON object")
    if schema.get("type") != "object":
        raise SchemaInvalid('the parameters schema must have "type": "object" (arguments are an object)')
    if len(canonical_json(schema)) > MAX_SCHEMA_CHARS:
        raise SchemaInvalid(f"the parameters schema is larger than {MAX_SCHEMA_CHARS} characters")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as error:
        where = _path(error.absolute_path)
        raise SchemaInvalid(f"invalid JSON Schema{f' at {where}' if where else ''}: {error.message}") from None


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of `schema` with `additionalProperties: false` on every object that leaves it unset."""
    return _strict(schema)


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(item) for item in node]
    if not isinstance(node, dict):
        return node
    result: dict[str, Any] = {}
    for key, value in node.items():
        if key == "allOf":
            result[key] = value
        elif key in ("properties", "$defs", "definitions", "patternProperties"):
            result[key] = {name: _strict(sub) for name, sub in value.items()} if isinstance(value, dict) else value
        elif key in ("items", "prefixItems", "additionalProperties", *_COMBINATORS_KEPT):
            result[key] = _strict(value)
        else:
            result[key] = value
    is_object = node.get("type") == "object" or "properties" in node
    if is_object and "additionalProperties" not in node and "unevaluatedProperties" not in node:
        result["additionalProperties"] = False
    return result


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=512)
def _validator(schema_json: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_json))


def arguments_parse(*, raw: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The arguments as a dict, checked against the strict form of `schema`.

    Raises ArgumentsInvalid with a message the model can act on."""
    if len(raw) > MAX_ARGUMENTS_CHARS:
        raise ArgumentsInvalid(f"arguments are longer than {MAX_ARGUMENTS_CHARS} characters")
    if not raw.strip():
        # Models send "" for a call without arguments; treat it as the empty object.
        arguments: Any = {}
    else:
        try:
            arguments = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ArgumentsInvalid(f"arguments are not valid JSON: {error}") from None
    if not isinstance(arguments, dict):
        raise ArgumentsInvalid(f"arguments must be a JSON object, not {_json_type(arguments)}")
    validator = _validator(canonical_json(strict_schema(schema)))
    errors = sorted(validator.iter_errors(arguments), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    if errors:
        messages = [error_message(error) for error in errors[:MAX_REPORTED_ERRORS]]
        more = len(errors) - len(messages)
        raise ArgumentsInvalid("; ".join(messages) + (f"; and {more} more" if more else ""), arguments)
    return arguments


def error_message(error: ValidationError) -> str:
    """One validation error, in terms of argument names rather than schema keywords."""
    where = _path(error.absolute_path)
    if error.validator == "required":
        missing = [name for name in error.validator_value if name not in (error.instance or {})]
        names = ", ".join(f"'{_join(where, name)}'" for name in missing)
        return f"missing required argument {names}"
    if error.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(error.instance, dict):
        allowed = set((error.schema.get("properties") or {}).keys())
        unknown = sorted(name for name in error.instance if name not in allowed)
        expected = ", ".join(sorted(allowed)) or "none"
        names = ", ".join(f"'{_join(where, name)}'" for name in unknown)
        return f"unknown argument {names} (allowed: {expected})"
    if where:
        return f"argument '{where}': {error.message}"
    return f"arguments: {error.message}"


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _path(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null"
