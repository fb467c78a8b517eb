"""The demo shows a tool call without directives: the simulator answers plain arithmetic and
time questions with a call to the offered tool that fits, then with the tool's result."""

from __future__ import annotations

import json
from io import StringIO

import openai
import pytest
from django.core.management import call_command
from jsonschema import Draft202012Validator

from conversations.models import Assistant
from simulator import Simulator
from tests.conftest import adb
from tests.simserver import SimulatorServer
from tests.test_simulator_tools import CALCULATOR, CLOCK, MODEL, TOOLS, streamed_calls, user
from tools.builtins import calculate


@pytest.fixture
def client(simulator_server: SimulatorServer, sim: Simulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=simulator_server.base_url, api_key="sk-test", max_retries=0, timeout=5)


def _call(client, question: str, **options) -> tuple[str, dict] | None:
    calls, _ = streamed_calls(client, user(question), **options)
    if not calls:
        return None
    assert len(calls) == 1
    return calls[0]["name"], json.loads(calls[0]["arguments"])


@pytest.mark.parametrize(
    ("question", "expression", "value"),
    [
        ("What is 17 * 23?", "17 * 23", 391),
        ("calculate (2+3)^2", "(2+3)**2", 25),
        ("Could you compute 12.5 / 5 for me?", "12.5 / 5", 2.5),
        ("how much is 3 + 4 × (2 - 1)?", "3 + 4 * (2 - 1)", 7),
    ],
)
def test_arithmetic_questions_call_the_calculator_with_valid_arguments(client, question, expression, value):
    name, arguments = _call(client, question)
    assert (name, arguments) == ("calculator", {"expression": expression})
    Draft202012Validator(CALCULATOR["function"]["parameters"]).validate(arguments)
    assert calculate(arguments["expression"]) == value


@pytest.mark.parametrize(
    ("question", "zone"),
    [
        ("What time is it in Tokyo?", "Asia/Tokyo"),
        ("what time is it in New York right now?", "America/New_York"),
        ("current time in paris", "Europe/Paris"),
        ("What time is it?", "UTC"),
    ],
)
def test_time_questions_call_the_clock_with_an_iana_zone(client, question, zone):
    name, arguments = _call(client, question)
    assert (name, arguments) == ("current_time", {"timezone": zone})
    Draft202012Validator(CLOCK["function"]["parameters"]).validate(arguments)


@pytest.mark.parametrize(
    ("question", "options"),
    [
        ("What is 17 * 23?", {"tools": [CLOCK]}),  # no calculator offered
        ("What time is it in Tokyo?", {"tools": [CALCULATOR]}),  # no clock offered
        ("What is 17 * 23?", {"tool_choice": "none"}),
        ("What time is it on Mars?", {}),  # no such time zone: no valid arguments
        ("What time is it in Atlantis?", {}),
        ("What is the capital of France?", {}),
        ("Our meeting is on 2026-12-03, what is the agenda?", {}),  # numbers, but no arithmetic
    ],
)
def test_no_call_when_no_offered_tool_fits(client, question, options):
    assert _call(client, question, **options) is None


def test_a_question_without_tools_is_answered_as_before(client):
    answer = client.chat.completions.create(model=MODEL, messages=user("What is 17 * 23?"))
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content.startswith("You said: What is 17 * 23")


def test_a_directive_still_decides(client):
    question = 'What is 5 * 5? [[sim:tool=calculator args={"expression": "2+2"}]]'
    assert _call(client, question) == ("calculator", {"expression": "2+2"})


def test_the_next_round_answers_with_the_tools_result(client):
    messages = user("What is 17 * 23?")
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude_none=True)]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"expression": "17 * 23", "result": 391})},
    ]
    second = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS)
    assert second.choices[0].message.tool_calls is None
    assert "391" in second.choices[0].message.content


@pytest.mark.django_db(transaction=True)
async def test_the_demo_assistant_answers_plain_questions_with_its_tools(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)(tools=["calculator", "current_time"])
    async with chat(await adb(setup.token)()) as socket:
        sums = await socket.turn("What is 17 * 23?")
        clock = await socket.turn("What time is it in Tokyo?", conversation_id=sums[0]["id"])
    for events, name, arguments, shown in (
        (sums, "calculator", {"expression": "17 * 23"}, "391"),
        (clock, "current_time", {"timezone": "Asia/Tokyo"}, "Asia/Tokyo"),
    ):
        call = next(e for e in events if e["type"] == "tool.call")
        assert (call["name"], call["arguments"]) == (name, arguments)
        assert next(e for e in events if e["type"] == "tool.result")["ok"] is True
        assert events[-1]["type"] == "message.completed"
        assert shown in "".join(e["content"] for e in events if e["type"] == "delta")


@pytest.mark.django_db
def test_the_seeded_demo_assistant_offers_the_calculator_and_the_clock(tmp_path, settings):
    settings.VAR_DIR = tmp_path
    call_command("seed_demo", stdout=StringIO())
    call_command("seed_demo", stdout=StringIO())
    demo = Assistant.objects.get(tenant__slug="demo", is_default=True)
    assert {"calculator", "current_time"} <= set(demo.tools)
