"""Tool calls from the simulator, streamed in fragments as OpenAI does, through the real SDK."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from jsonschema import Draft202012Validator

from simulator import Simulator
from tests.simserver import SimulatorServer

MODEL = "gpt-4o-mini"
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "current_time", "description": "The time now in a timezone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                   "additionalProperties": False}}}
TOOLS = [CALCULATOR, CLOCK]
ASK_SUM = 'What is 2+2? [[sim:tool=calculator args={"expression": "2+2"}]]'
ASK_BOTH = ('Sum and time [[sim:tool=calculator,current_time '
            'args=[{"expression":"6*7"},{"timezone":"Europe/Paris"}]]]')


@pytest.fixture
def client(simulator_server: SimulatorServer, sim: Simulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=simulator_server.base_url, api_key="sk-test", max_retries=0,
                         timeout=5)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def streamed_calls(client: openai.OpenAI, messages: list[dict[str, Any]], **options: Any,
                   ) -> tuple[dict[int, dict[str, Any]], list[Any]]:
    """The calls reassembled by index from the SDK's chunks, and the chunks."""
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True},
        **{"tools": TOOLS, **options}))
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for part in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if part.id:
                assert part.index not in calls and part.type == "function"
                assert part.function.arguments == ""
                calls[part.index] = {"id": part.id, "name": part.function.name, "arguments": "",
                                     "fragments": 0}
            else:
                assert part.function.name is None and part.type is None
                calls[part.index]["arguments"] += part.function.arguments
                calls[part.index]["fragments"] += 1
    return calls, chunks


def test_a_streamed_call_arrives_in_fragments_that_reassemble(
    client: openai.OpenAI, sim: Simulator,
) -> None:
    calls, chunks = streamed_calls(client, user(ASK_SUM))

    opening = chunks[0].choices[0].delta
    assert opening.role == "assistant" and opening.content is None
    assert opening.tool_calls[0].id.startswith("call_")
    assert list(calls) == [0] and calls[0]["name"] == "calculator"
    assert calls[0]["fragments"] >= 2
    assert json.loads(calls[0]["arguments"]) == {"expression": "2+2"}
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    assert chunks[-1].usage.completion_tokens > 0
    assert not any(c.choices[0].delta.content for c in chunks[:-1])
    assert sim.stats.tool_calls == 1


def test_a_non_streamed_call_has_null_content(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=user(ASK_SUM), tools=TOOLS)

    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "2+2"}


def test_parallel_calls_use_indexes_in_order(client: openai.OpenAI) -> None:
    calls, chunks = streamed_calls(client, user(ASK_BOTH))

    assert [calls[i]["name"] for i in sorted(calls)] == ["calculator", "current_time"]
    assert json.loads(calls[0]["arguments"]) == {"expression": "6*7"}
    assert json.loads(calls[1]["arguments"]) == {"timezone": "Europe/Paris"}
    assert calls[0]["id"] != calls[1]["id"]
    indexes = [part.index for chunk in chunks if chunk.choices
               for part in chunk.choices[0].delta.tool_calls or []]
    assert indexes == sorted(indexes)  # the first call is whole before the second begins

    whole = client.chat.completions.create(model=MODEL, messages=user(ASK_BOTH), tools=TOOLS)
    assert [c.function.name for c in whole.choices[0].message.tool_calls] == [
        "calculator", "current_time"]


def test_parallel_tool_calls_false_keeps_the_first_call(client: openai.OpenAI) -> None:
    calls, _ = streamed_calls(client, user(ASK_BOTH), parallel_tool_calls=False)

    assert [call["name"] for call in calls.values()] == ["calculator"]


def test_bad_args_breaks_the_schema_of_the_first_call_only(client: openai.OpenAI) -> None:
    calls, _ = streamed_calls(client, user(ASK_BOTH[:-2] + " bad_args=1]]"))

    first, second = (json.loads(calls[i]["arguments"]) for i in (0, 1))
    calculator = Draft202012Validator(CALCULATOR["function"]["parameters"])
    clock = Draft202012Validator(CLOCK["function"]["parameters"])
    assert not calculator.is_valid(first) and first["expression"] == 12345
    assert clock.is_valid(second)


def test_bad_json_makes_the_first_call_unparseable(client: openai.OpenAI) -> None:
    calls, _ = streamed_calls(client, user(ASK_SUM[:-2] + " bad_json=1]]"))

    with pytest.raises(json.JSONDecodeError):
        json.loads(calls[0]["arguments"])


def test_tool_choice_none_answers_text_despite_the_directive(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=user(ASK_SUM), tools=TOOLS,
                                            tool_choice="none")

    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content.startswith("You said: What is 2+2. (turn 1)")
    assert answer.choices[0].finish_reason == "stop"


def test_ignore_tool_choice_calls_despite_tool_choice_none(client: openai.OpenAI) -> None:
    ask = ASK_SUM[:-2] + " ignore_tool_choice=1]]"
    answer = client.chat.completions.create(model=MODEL, messages=user(ask), tools=TOOLS, tool_choice="none")

    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.choices[0].message.tool_calls[0].function.name == "calculator"


def test_a_named_tool_choice_is_called(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "current_time"}}
    plain = client.chat.completions.create(model=MODEL, messages=user("What time is it?"),
                                           tools=TOOLS, tool_choice=named)
    directed = client.chat.completions.create(
        model=MODEL, tools=TOOLS, tool_choice=named,
        messages=user('Time? [[sim:tool=current_time args={"timezone":"UTC"}]]'))

    (call,) = plain.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("current_time", "{}")
    (call,) = directed.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"timezone": "UTC"}


def test_required_without_a_directive_calls_the_first_tool(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=user("Do something."),
                                            tools=TOOLS, tool_choice="required")

    (call,) = answer.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("calculator", "{}")


def test_a_tool_not_offered_is_unavailable(client: openai.OpenAI) -> None:
    ask = user("Search [[sim:tool=web_search]]")
    offered = client.chat.completions.create(model=MODEL, messages=ask, tools=TOOLS)
    none = client.chat.completions.create(model=MODEL, messages=ask)

    for answer in (offered, none):
        assert answer.choices[0].message.tool_calls is None
        assert answer.choices[0].message.content.startswith(
            "Tool web_search is unavailable. You said: Search.")


def called_then_answered(client: openai.OpenAI, ask: str) -> list[dict[str, Any]]:
    """A history that ends with the results of the calls the simulator made."""
    first = client.chat.completions.create(model=MODEL, messages=user(ask), tools=TOOLS)
    message = first.choices[0].message
    results = {"calculator": "4", "current_time": "2025-01-01T12:00:00+01:00"}
    return [*user(ask), message.model_dump(exclude_none=True), *(
        {"role": "tool", "tool_call_id": call.id, "content": results[call.function.name]}
        for call in message.tool_calls)]


def test_after_tool_results_the_answer_uses_them(client: openai.OpenAI) -> None:
    history = called_then_answered(client, ASK_BOTH)

    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)

    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and choice.message.tool_calls is None
    assert choice.message.content.startswith(
        "Tool results: calculator: 4; current_time: 2025-01-01T12:00:00+01:00.")


def test_tool_loop_keeps_calling_after_results(client: openai.OpenAI, sim: Simulator) -> None:
    history = called_then_answered(client, ASK_SUM[:-2] + " tool_loop=1]]")

    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)

    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.choices[0].message.tool_calls[0].function.name == "calculator"
    assert sim.stats.tool_calls == 2


def test_an_orphaned_tool_message_is_a_bad_request(client: openai.OpenAI, sim: Simulator) -> None:
    history = called_then_answered(client, ASK_BOTH)
    orphaned = [history[0], history[2]]            # the results without their call
    unanswered = history[:3]                      # one of two calls without its result
    stranger = [*history[:3], {**history[3], "tool_call_id": "call_unknown"}]

    for messages in (orphaned, unanswered, stranger):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
        assert caught.value.type == "invalid_request_error"
    assert "preceeding message with 'tool_calls'" in str(caught.value)
    assert sim.stats.errors == 3


def test_a_whole_history_replays_without_a_400(client: openai.OpenAI) -> None:
    history = called_then_answered(client, ASK_BOTH)
    text = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)
    history += [text.choices[0].message.model_dump(exclude_none=True), *user("And now?")]

    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS)

    assert answer.choices[0].message.content.startswith("You said: And now. (turn 2)")


def test_tool_choice_needs_tools(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=user("hi"), tool_choice="none")
    assert caught.value.param == "tool_choice"


def test_max_tokens_cuts_a_call_with_length(client: openai.OpenAI) -> None:
    long_ask = user('[[sim:tool=calculator args={"expression":"1+2+3+4+5+6+7+8+9+10+11+12"}]]')
    answer = client.chat.completions.create(model=MODEL, messages=long_ask, tools=TOOLS,
                                            max_tokens=4)

    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens <= 4
    assert answer.choices[0].message.tool_calls[0].function.name == "calculator"


@pytest.mark.asyncio
async def test_a_cut_tool_call_stream_breaks_after_n_fragments(
    simulator_server: SimulatorServer, sim: Simulator,
) -> None:
    client = openai.AsyncOpenAI(base_url=simulator_server.base_url, api_key="sk-test",
                                max_retries=0, timeout=5)
    stream = await client.chat.completions.create(
        model=MODEL, messages=user(ASK_SUM[:-2] + " cut=1]]"), tools=TOOLS, stream=True)
    parts = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            parts += chunk.choices[0].delta.tool_calls or []

    assert len(parts) == 2  # the header, one fragment
    assert sim.stats.incomplete == 1 and sim.stats.tool_calls == 0


def test_an_injected_tool_call_overrides_the_message(client: openai.OpenAI, sim: Simulator) -> None:
    sim.inject(tool="current_time", args={"timezone": "Asia/Tokyo"})

    first = client.chat.completions.create(model=MODEL, messages=user("hi"), tools=TOOLS)
    second = client.chat.completions.create(model=MODEL, messages=user("hi"), tools=TOOLS)

    (call,) = first.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"timezone": "Asia/Tokyo"}
    assert second.choices[0].message.tool_calls is None
