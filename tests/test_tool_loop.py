"""Function calling through the engine and the WebSocket: the bounded, validated tool loop."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from unittest.mock import ANY

import pytest

from billing.models import SpendingCap, UsageRecord
from conversations.models import Message
from tests.conftest import adb
from tools.registry import BUILTINS, Tool, handler_run, tool_register

pytestmark = pytest.mark.django_db(transaction=True)


def _stored(conversation_id):
    return list(
        Message.objects.filter(conversation_id=conversation_id)
        .order_by("seq")
        .values("seq", "role", "content", "tool_calls", "tool_call_id", "status")
    )


async def _tenant(tenant_factory, tools=("calculator", "current_time"), **assistant):
    setup = await adb(tenant_factory)(tools=list(tools))
    for name, value in assistant.items():
        setattr(setup.assistant, name, value)
    await adb(setup.assistant.save)()
    return setup


async def test_a_single_tool_call_round_trip(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory)
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn('What is 6*7? [[sim:tool=calculator args={"expression":"6*7"}]]')

    types = [e["type"] for e in events]
    assert types[:3] == ["conversation", "message.accepted", "message.started"]
    call = next(e for e in events if e["type"] == "tool.call")
    result = next(e for e in events if e["type"] == "tool.result")
    assert call["name"] == "calculator" and call["arguments"] == {"expression": "6*7"}
    assert call["message_id"] == events[2]["message_id"]
    assert result == {"type": "tool.result", "call_id": call["call_id"], "ok": True, "offset": ANY}
    assert types.index("tool.call") < types.index("tool.result") < types.index("delta")
    completed = events[-1]
    assert completed["type"] == "message.completed" and completed["finish_reason"] == "stop"

    stored = await adb(_stored)(events[0]["id"])
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1]["tool_calls"][0]["id"] == call["call_id"] and stored[2]["tool_call_id"] == call["call_id"]
    assert "42" in stored[2]["content"] and "42" in stored[3]["content"]  # the answer uses the result
    # Two upstream calls, two usage records, both in the completed totals.
    records = await adb(lambda: list(UsageRecord.objects.filter(tenant=setup.tenant).order_by("created_at")))()
    assert len(records) == 2
    assert completed["usage"]["prompt_tokens"] == sum(r.prompt_tokens for r in records)
    assert Decimal(completed["cost_usd"]) == sum(r.cost_usd for r in records)
    # Tool definitions were sent, sorted, with the assistant's tool_choice.
    first_request = sim.requests[-2]
    assert [t["function"]["name"] for t in first_request["tools"]] == ["calculator", "current_time"]
    assert first_request["tool_choice"] == "auto"


async def test_the_stored_history_replays_without_a_400(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory)
    async with chat(await adb(setup.token)()) as socket:
        first = await socket.turn(
            'Two things [[sim:tool=calculator,current_time args=[{"expression":"1+1"},{"timezone":"UTC"}]]]'
        )
        conversation_id = first[0]["id"]
        second = await socket.turn("and again?", conversation_id=conversation_id)
    assert second[-1]["type"] == "message.completed"
    # The simulator answers 400 to an orphaned or unanswered call, as OpenAI does; the replayed
    # history carried both calls and both results.
    replayed = sim.requests[-1]["messages"]
    assert [m["role"] for m in replayed] == ["system", "user", "assistant", "tool", "tool", "assistant", "user"]


async def test_parallel_calls_run_concurrently(tenant_factory, chat, sim):
    spans: list[tuple[float, float]] = []

    async def slow(*, seconds: float = 0.4) -> dict:
        started = time.monotonic()
        await asyncio.sleep(seconds)
        spans.append((started, time.monotonic()))
        return {"slept": seconds}

    tool_register(Tool(name="slow_test_tool", description="sleeps", run=handler_run(slow), parameters={
        "type": "object", "properties": {"seconds": {"type": "number"}}, "required": [],
    }))
    try:
        setup = await _tenant(tenant_factory, tools=("slow_test_tool",))
        async with chat(await adb(setup.token)()) as socket:
            events = await socket.turn(
                'Sleep twice [[sim:tool=slow_test_tool,slow_test_tool args=[{"seconds":0.4},{"seconds":0.4}]]]'
            )
    finally:
        BUILTINS.pop("slow_test_tool", None)
    assert [e["ok"] for e in events if e["type"] == "tool.result"] == [True, True]
    # Concurrent: each call started before the other ended (measured in the handlers, so a
    # loaded machine's slower turn does not decide it; run one after the other, they cannot overlap).
    (first_start, first_end), (second_start, second_end) = sorted(spans)
    assert second_start < first_end


async def test_invalid_arguments_are_not_executed_and_the_model_corrects_itself(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory)
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn('Compute [[sim:tool=calculator args={"expression":"2+2"} bad_args=1]]')
    results = [e for e in events if e["type"] == "tool.result"]
    assert results[0]["ok"] is False
    stored = await adb(_stored)(events[0]["id"])
    tool_message = next(m for m in stored if m["role"] == "tool")
    assert "expression" in tool_message["content"] and "error" in tool_message["content"]
    assert events[-1]["type"] == "message.completed"
    # The next round's request carried the error back to the model.
    assert sim.requests[-1]["messages"][-1]["role"] == "tool"


async def test_unknown_tool_and_bad_json_are_answered_without_execution(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory, tools=("calculator",))
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn('Bad json [[sim:tool=calculator args={"expression":"1"} bad_json=1]]')
    assert [e["ok"] for e in events if e["type"] == "tool.result"] == [False]
    stored = await adb(_stored)(events[0]["id"])
    assert "JSON" in next(m for m in stored if m["role"] == "tool")["content"]


async def test_the_loop_stops_at_the_round_limit_and_asks_for_a_final_answer(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory, max_tool_rounds=2)
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn('Loop [[sim:tool=calculator args={"expression":"1+1"} tool_loop=1]]')
    assert len([e for e in events if e["type"] == "tool.call"]) == 2
    assert events[-1]["type"] == "message.completed"
    assert len(sim.requests) == 3
    assert sim.requests[-1]["tool_choice"] == "none"
    records = await adb(UsageRecord.objects.filter(tenant=setup.tenant).count)()
    assert records == 3


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("none", "none"),
        ("required", "required"),
        ("current_time", {"type": "function", "function": {"name": "current_time"}}),
    ],
)
async def test_tool_choice_is_honoured_in_the_request(tenant_factory, chat, sim, choice, expected):
    setup = await _tenant(tenant_factory, tool_choice=choice, max_tool_rounds=1)
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("what time is it?")
    assert sim.requests[0]["tool_choice"] == expected
    calls = [e for e in events if e["type"] == "tool.call"]
    if choice == "none":
        assert calls == []
    else:
        assert calls and calls[0]["name"] in ("calculator", "current_time")
    assert events[-1]["type"] == "message.completed"


async def test_each_round_draws_on_the_caps(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory, max_tokens=200)
    # Enough for the first call's reservation, not for a second one on top of what it spent.
    await adb(SpendingCap.objects.create)(
        tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("0.0004")
    )
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn('Loop [[sim:tool=calculator args={"expression":"1+1"} tool_loop=1]]')
    assert events[-1]["type"] == "error" and events[-1]["code"] == "spending_cap_exceeded"
    spent = await adb(lambda: sum(r.cost_usd for r in UsageRecord.objects.filter(tenant=setup.tenant)))()
    assert spent <= Decimal("0.0004")
    stored = await adb(_stored)(events[0]["id"])
    assert [m["role"] for m in stored][:3] == ["user", "assistant", "tool"]
    assert stored[-1]["role"] == "assistant" and stored[-1]["status"] == "incomplete"


async def _assistant_messages(conversation_id):
    return await adb(lambda: list(
        Message.objects.filter(conversation_id=conversation_id, role="assistant", tool_calls__isnull=True)
        .values("status", "finish_reason", "content")
    ))()


async def test_a_model_that_ignores_tool_choice_none_is_stopped_after_the_round_limit(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory, max_tool_rounds=2)
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn(
            'Loop [[sim:tool=calculator args={"expression":"1+1"} tool_loop=1 ignore_tool_choice=1]]'
        )
    completed = events[-1]
    assert completed["type"] == "message.completed" and completed["finish_reason"] == "tool_rounds_exhausted"
    assert len(sim.requests) == 3  # max_tool_rounds + 1, the last one with tool_choice "none"
    assert sim.requests[-1]["tool_choice"] == "none"
    [answer] = await _assistant_messages(events[0]["id"])
    assert answer["status"] == "incomplete" and answer["finish_reason"] == "tool_rounds_exhausted"
    records = await adb(lambda: list(UsageRecord.objects.filter(tenant=setup.tenant)))()
    assert len(records) == 3  # every call billed
    assert Decimal(completed["cost_usd"]) == sum(r.cost_usd for r in records)
    await asyncio.sleep(2)  # nothing keeps calling the model after the terminal event
    assert len(sim.requests) == 3


async def test_a_generation_past_its_wall_clock_budget_ends_incomplete_and_billed(tenant_factory, chat, sim, settings):
    settings.GENERATION_MAX_SECONDS = 0.6
    setup = await _tenant(tenant_factory, tools=())
    async with chat(await adb(setup.token)()) as socket:
        started = time.monotonic()
        events = await socket.turn("Tell me a long story [[sim:words=40 tps=10]]")  # about 4 s
        elapsed = time.monotonic() - started
    completed = events[-1]
    assert completed["type"] == "message.completed" and completed["finish_reason"] == "time_budget_exhausted"
    assert elapsed < 2
    streamed = "".join(e["content"] for e in events if e["type"] == "delta")
    [answer] = await _assistant_messages(events[0]["id"])
    assert answer == {"status": "incomplete", "finish_reason": "time_budget_exhausted", "content": streamed}
    assert streamed and completed["usage"]["completion_tokens"] > 0
    [record] = await adb(lambda: list(UsageRecord.objects.filter(tenant=setup.tenant)))()
    assert record.completion_tokens == completed["usage"]["completion_tokens"]
    assert Decimal(completed["cost_usd"]) == record.cost_usd > 0
