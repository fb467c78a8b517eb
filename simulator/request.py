"""Parsing and validating a chat completion request the way OpenAI does (the parts we model)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .directives import Directives, parse_directives, strip_directives
from .errors import ApiError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
TOOL_CHOICES = ("none", "auto", "required")
ECHO_WORDS = 8


@dataclass
class ParsedRequest:
    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    directives: Directives
    echo: str           # the last user message, directives stripped
    user_turns: int
    seed: bytes         # hash of the messages without directives: the same chat, the same answer
    fingerprint: str    # hash of model + raw messages: what fail_times counts
    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"        # "none" | "auto" | "required" | "named"
    named_tool: str | None = None    # with tool_choice "named"
    parallel_tool_calls: bool = True

    @property
    def tool_names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools or []]

    def echo_words(self) -> list[str]:
        """``You said: <first words of the last user message>. (turn N)``, as words."""
        echoed = self.echo.split()[:ECHO_WORDS] or ["nothing"]
        echoed[-1] = echoed[-1].rstrip(".!?,;:") + "."
        return ["You", "said:", *echoed, "(turn", f"{self.user_turns})"]

    def tool_schema(self, name: str) -> dict[str, Any] | None:
        for tool in self.tools or []:
            if tool["function"]["name"] == name:
                parameters = tool["function"].get("parameters")
                return parameters if isinstance(parameters, dict) else None
        return None


def message_text(message: dict[str, Any]) -> str:
    """Text of a message whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def parse_chat_request(raw: bytes) -> ParsedRequest:
    """Validate a chat completion body. Raises ApiError."""
    body = json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    messages = _valid_messages(body.get("messages"))
    stream = _valid_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is "
                            "enabled.", param="stream_options")
    tools = _valid_tools(body)
    tool_choice, named_tool = _valid_tool_choice(body, tools)
    users = [m for m in messages if m["role"] == "user"]
    directives, echo = parse_directives(message_text(users[-1])) if users else (Directives(), "")
    cleaned = [{**m, "content": strip_directives(message_text(m))} for m in messages]
    return ParsedRequest(
        body=body, model=model, messages=messages, stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        max_tokens=_max_tokens(body), directives=directives, echo=echo, user_turns=len(users),
        seed=_digest(cleaned), fingerprint=_digest([model, messages]).hex(),
        tools=tools, tool_choice=tool_choice, named_tool=named_tool,
        parallel_tool_calls=_valid_parallel(body, tools),
    )


def _digest(value: Any) -> bytes:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()


def json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "We could not parse the JSON body of your request. The OpenAI API "
                            "expects a JSON payload.")
    return body


def _missing(param: str) -> ApiError:
    return ApiError(400, f"Missing required parameter: '{param}'.", param=param,
                    code="missing_required_parameter")


def _valid_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "Invalid 'messages': expected a non-empty array.", param="messages",
                       code="empty_array" if messages == [] else "invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise _missing(f"messages[{i}].role")
        if message["role"] not in ROLES:
            raise ApiError(400, f"Invalid value: {message['role']!r}. Supported values are: "
                                f"{', '.join(sorted(ROLES))}.", param=f"messages[{i}].role",
                           code="invalid_value")
        if message["role"] == "assistant" and message.get("tool_calls") is not None:
            _valid_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
        if message["role"] == "tool" and not isinstance(message.get("tool_call_id"), str):
            raise _missing(f"messages[{i}].tool_call_id")
    _check_tool_pairing(messages)
    return messages


def _valid_tool_calls(calls: Any, param: str) -> None:
    if not isinstance(calls, list) or not calls:
        raise ApiError(400, f"Invalid '{param}': expected a non-empty array.", param=param,
                       code="empty_array" if calls == [] else "invalid_type")
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            raise ApiError(400, f"Invalid type for '{param}[{j}]': expected an object.",
                           param=f"{param}[{j}]", code="invalid_type")
        function = call.get("function")
        for name, value in (("id", call.get("id")), ("type", call.get("type")),
                            ("function", function)):
            if value is None:
                raise _missing(f"{param}[{j}].{name}")
        if not isinstance(function, dict):
            raise ApiError(400, f"Invalid type for '{param}[{j}].function': expected an object.",
                           param=f"{param}[{j}].function", code="invalid_type")
        for name in ("name", "arguments"):
            if not isinstance(function.get(name), str):
                raise _missing(f"{param}[{j}].function.{name}")


def _check_tool_pairing(messages: list[dict[str, Any]]) -> None:
    """Every tool message answers a call of the assistant message just before its run of tool
    messages, and every such call is answered: what OpenAI checks (orphans are a 400)."""
    open_at, unanswered = -1, list[str]()  # the assistant message whose calls await results
    for i, message in enumerate(messages):
        if message["role"] == "tool":
            call_id = message["tool_call_id"]
            if open_at < 0 or call_id not in unanswered:
                raise ApiError(400, "Invalid parameter: messages with role 'tool' must be a "
                                    "response to a preceeding message with 'tool_calls'.",
                               param=f"messages.[{i}].role")
            unanswered.remove(call_id)
            continue
        _require_answered(open_at, unanswered)
        open_at, unanswered = -1, []
        if message["role"] == "assistant" and message.get("tool_calls"):
            open_at, unanswered = i, [call["id"] for call in message["tool_calls"]]
    _require_answered(open_at, unanswered)


def _require_answered(index: int, unanswered: list[str]) -> None:
    if unanswered:
        raise ApiError(400, "An assistant message with 'tool_calls' must be followed by tool "
                            "messages responding to each 'tool_call_id'. The following "
                            f"tool_call_ids did not have response messages: "
                            f"{', '.join(unanswered)}", param=f"messages.[{index}].role")


def _valid_tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "Invalid type for 'tools': expected an array of objects.",
                       param="tools", code="invalid_type")
    if not tools:
        raise ApiError(400, "Invalid 'tools': empty array. Expected an array with minimum length "
                            "1, but got an empty array instead.", param="tools", code="empty_array")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ApiError(400, f"Invalid type for 'tools[{i}]': expected an object.",
                           param=f"tools[{i}]", code="invalid_type")
        if tool.get("type") != "function":
            raise ApiError(400, f"Invalid value: {tool.get('type')!r}. Supported values are: "
                                "'function'.", param=f"tools[{i}].type", code="invalid_value")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _missing(f"tools[{i}].function.name")
    return tools


def _valid_tool_choice(
    body: dict[str, Any], tools: list[dict[str, Any]] | None,
) -> tuple[str, str | None]:
    choice = body.get("tool_choice")
    if choice is None:
        return "auto", None
    if tools is None:
        raise ApiError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                            "'tools' are specified.", param="tool_choice")
    if choice in TOOL_CHOICES:
        return choice, None
    name = _named_choice(choice)
    if name is None:
        raise ApiError(400, "Invalid value for 'tool_choice': expected 'none', 'auto', "
                            "'required' or a named function.", param="tool_choice",
                       code="invalid_value")
    if name not in [tool["function"]["name"] for tool in tools]:
        raise ApiError(400, f"Invalid value for 'tool_choice': tool '{name}' is not in 'tools'.",
                       param="tool_choice", code="invalid_value")
    return "named", name


def _named_choice(choice: Any) -> str | None:
    """X of ``{"type": "function", "function": {"name": X}}``, else None."""
    if not isinstance(choice, dict) or choice.get("type") != "function":
        return None
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else None


def _valid_parallel(body: dict[str, Any], tools: list[dict[str, Any]] | None) -> bool:
    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        return True
    if tools is None:
        raise ApiError(400, "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is "
                            "only allowed when 'tools' are specified.", param="parallel_tool_calls")
    return _valid_bool(body, "parallel_tool_calls")


def _valid_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"Invalid type for '{name}': expected a boolean.", param=name,
                       code="invalid_type")
    return bool(value)


def _max_tokens(body: dict[str, Any]) -> int | None:
    """max_completion_tokens (the newer name) wins over max_tokens, as in OpenAI's API."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"Invalid '{name}': expected an integer >= 1, got {value!r}.",
                           param=name, code="integer_below_min_value")
        return value
    return None
