"""The simulator's prompt-prefix cache, as OpenAI documents it, seen through the real SDK."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

from llm.tokens import count_messages
from simulator import Simulator, create_app, prompt_token_sequence
from tests.simserver import SimulatorServer

MODEL = "gpt-4o-mini"
# About 1,500 tokens of stable system prompt: long enough to cache, short enough to be quick.
SYSTEM = " ".join(f"Rule {i}: answer the customer politely and check the order number." for i in
                  range(120))


def client_for(server: SimulatorServer, api_key: str = "sk-cache-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=5)


@pytest.fixture
def client(simulator_server: SimulatorServer, sim: Simulator) -> openai.OpenAI:
    return client_for(simulator_server)


def conversation(question: str, system: str = SYSTEM) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def cached(client: openai.OpenAI, messages: list[dict[str, Any]], **options: Any) -> int:
    usage = client.chat.completions.create(model=MODEL, messages=messages, **options).usage
    return usage.prompt_tokens_details.cached_tokens


def on_the_grid(tokens: int) -> bool:
    return tokens >= 1024 and (tokens - 1024) % 128 == 0


def test_the_second_identical_long_prompt_is_cached_in_128_token_steps(
    client: openai.OpenAI, sim: Simulator,
) -> None:
    messages = conversation("Where is my order?")
    prompt_tokens = count_messages(messages, MODEL)
    assert prompt_tokens >= 1024 + 128

    first = cached(client, messages)
    second = client.chat.completions.create(model=MODEL, messages=messages).usage

    assert first == 0
    hit = second.prompt_tokens_details.cached_tokens
    assert on_the_grid(hit) and prompt_tokens - 128 < hit <= prompt_tokens
    assert second.prompt_tokens == prompt_tokens
    assert sim.stats.cached_tokens == hit


def test_a_streamed_answer_reports_the_hit_in_its_usage_chunk(client: openai.OpenAI) -> None:
    messages = conversation("Stream it, please.")
    assert cached(client, messages) == 0

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}))

    assert on_the_grid(chunks[-1].usage.prompt_tokens_details.cached_tokens)


def test_the_cache_belongs_to_one_api_key(
    simulator_server: SimulatorServer, client: openai.OpenAI,
) -> None:
    messages = conversation("Is this cached for everyone?")
    cached(client, messages)

    assert cached(client_for(simulator_server, "sk-cache-b"), messages) == 0
    assert cached(client, messages) > 0


def test_a_prompt_under_1024_tokens_is_never_cached(client: openai.OpenAI) -> None:
    messages = conversation("Short one.", system=SYSTEM[: len(SYSTEM) // 2])
    assert count_messages(messages, MODEL) < 1024

    assert [cached(client, messages) for _ in range(3)] == [0, 0, 0]


def test_a_shared_prefix_is_a_partial_hit_rounded_down_to_the_grid(client: openai.OpenAI) -> None:
    first = conversation("First question about refunds.")
    # The same opening, then a different ending of the system prompt: only the opening matches.
    ending = " ".join(f"Note {i}: be brief." for i in range(40))
    second = conversation("Second question.", system=SYSTEM[:6000] + ending)
    shared = common_prefix(prompt_token_sequence(first, MODEL),
                           prompt_token_sequence(second, MODEL))
    assert 1024 + 128 < shared < count_messages(second, MODEL) - 128

    cached(client, first)
    hit = cached(client, second)

    assert hit == 1024 + (shared - 1024) // 128 * 128


def test_the_next_turn_hits_the_whole_previous_prompt(client: openai.OpenAI) -> None:
    turn_one = conversation("Hello, I need help.")
    answer = client.chat.completions.create(model=MODEL, messages=turn_one).choices[0].message
    turn_two = [*turn_one, {"role": "assistant", "content": answer.content},
                {"role": "user", "content": "Thanks, and one more thing."}]

    hit = cached(client, turn_two)

    # The previous prompt (priming included) is a prefix of this one, so all of it can hit.
    previous = count_messages(turn_one, MODEL)
    assert hit == 1024 + (previous - 1024) // 128 * 128


def test_nocache_bypasses_the_cache(client: openai.OpenAI) -> None:
    messages = conversation("Cache me.")
    bypass = conversation("Cache me. [[sim:nocache=1]]")

    assert cached(client, bypass) == 0   # nothing stored either ...
    assert cached(client, messages) == 0
    assert cached(client, bypass) == 0   # ... and nothing looked up
    assert cached(client, messages) > 0


def test_different_tool_definitions_are_a_different_prefix(client: openai.OpenAI) -> None:
    messages = conversation("Any tools today?")
    calculator = {"type": "function", "function": {"name": "calculator", "parameters": {}}}
    clock = {"type": "function", "function": {"name": "current_time", "parameters": {}}}
    cached(client, messages, tools=[calculator, clock])

    assert cached(client, messages, tools=[clock, calculator]) == 0
    assert cached(client, messages, tools=[calculator, clock]) > 0


def test_entries_expire_after_the_ttl() -> None:
    with SimulatorServer(create_app(cache_ttl_s=0.2)) as server:
        client = client_for(server)
        messages = conversation("Will this be remembered?")
        cached(client, messages)
        assert cached(client, messages) > 0  # a hit also refreshes the entry

        time.sleep(0.3)

        assert cached(client, messages) == 0
        assert server.app.stats.cached_tokens > 0


def test_the_prompt_sequence_has_exactly_prompt_tokens() -> None:
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi", "name": "ada"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "calculator", "arguments": '{"expression":"2+2"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "parts are counted"},
                                     {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}}]},
    ]
    for model in ("gpt-4o", "gpt-3.5-turbo"):
        assert len(prompt_token_sequence(messages, model)) == count_messages(messages, model)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
