"""A generation whose process died: its heartbeat stops, and the sweep stores what streamed
(the event log is the checkpoint), bills it once, releases its hold, frees the conversation
and tells the joined sockets."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from django.utils import timezone

from billing.models import CapPeriod, Reservation, SpendingCap, UsageRecord
from conversations import engine, recovery, services, turns
from conversations.gatekeepers import Caller
from conversations.models import Conversation, Message
from conversations.protocol import Delta, MessageStarted
from llm.tokens import count_text
from streaming import eventlog
from tests.conftest import adb

pytestmark = pytest.mark.django_db(transaction=True)

DELTAS = ["Once", " upon", " a", " time", " there"]


def _claim(setup) -> turns.TurnPlan:
    """A turn claimed as a web process claims it (message committed, hold placed on a cap)."""
    if not SpendingCap.objects.filter(tenant=setup.tenant).exists():
        SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=100)
    end_user = setup.end_user()
    return turns.turn_prepare(
        caller=Caller(tenant_id=setup.tenant.pk, end_user_id=end_user.pk), content="tell me a story",
        conversation_id=None, assistant_slug=None, client_msg_id=None, control_channel="gone",
    )


def _heartbeat_stopped(plan, seconds: int = 120) -> None:
    Conversation.objects.filter(pk=plan.conversation_id).update(
        generation_beat_at=timezone.now() - timedelta(seconds=seconds)
    )


async def _streamed_then_died(setup, *, deltas=DELTAS) -> turns.TurnPlan:
    """What a generation leaves behind when its process is killed mid-stream: the claim, the
    hold and the log, and nothing running."""
    plan = await adb(_claim)(setup)
    await recovery.round_record(plan, round_number=0, prompt_tokens=plan.prompt.tokens)
    await engine.publish(plan, MessageStarted(message_id=str(plan.assistant_message_id), model=plan.model))
    for content in deltas:
        await engine.publish(plan, Delta(message_id=str(plan.assistant_message_id), content=content))
    await adb(_heartbeat_stopped)(plan)
    return plan


async def test_sweep_stores_bills_and_frees_a_dead_generation(tenant_factory, sim):
    setup = await adb(tenant_factory)()
    plan = await _streamed_then_died(setup)

    assert await recovery.generations_recover() == 1

    answer = await Message.objects.aget(pk=plan.assistant_message_id)
    assert answer.content == "".join(DELTAS)
    assert answer.status == "incomplete" and answer.finish_reason == "interrupted"
    records = [r async for r in UsageRecord.objects.filter(conversation_id=plan.conversation_id)]
    assert len(records) == 1
    assert records[0].completion_tokens == count_text("".join(DELTAS), plan.model) and records[0].estimated
    assert records[0].prompt_tokens == plan.prompt.tokens and records[0].cost_usd > 0
    assert not await Reservation.objects.filter(status="held").aexists()
    period = await CapPeriod.objects.aget(cap__tenant=setup.tenant)
    assert period.reserved_usd == 0 and period.spent_usd == records[0].cost_usd
    conversation = await Conversation.objects.aget(pk=plan.conversation_id)
    assert conversation.generation_id is None
    key = eventlog.log_key(plan.group)
    _, last = (await eventlog.read_all(eventlog.event_log(), key))[-1]
    assert last["type"] == "error" and last["message_id"] == str(plan.assistant_message_id)
    # Once only: a second sweep finds nothing to do.
    assert await recovery.generations_recover() == 0
    assert await UsageRecord.objects.filter(conversation_id=plan.conversation_id).acount() == 1


async def test_a_live_generation_is_not_swept(tenant_factory, sim):
    setup = await adb(tenant_factory)()
    plan = await adb(_claim)(setup)
    assert await adb(services.generations_beat)(generation_ids=[plan.assistant_message_id]) == 1
    assert await recovery.generations_recover() == 0
    assert (await Conversation.objects.aget(pk=plan.conversation_id)).generation_id == plan.assistant_message_id
    assert await Reservation.objects.filter(status="held").aexists()


async def test_a_dead_generation_that_streamed_nothing_costs_nothing(tenant_factory, sim):
    setup = await adb(tenant_factory)()
    plan = await _streamed_then_died(setup, deltas=[])
    assert await recovery.generations_recover() == 1
    assert (await Message.objects.aget(pk=plan.assistant_message_id)).content == ""
    assert not await UsageRecord.objects.filter(conversation_id=plan.conversation_id).aexists()
    assert not await Reservation.objects.filter(status="held").aexists()
    assert (await CapPeriod.objects.aget(cap__tenant=setup.tenant)).reserved_usd == 0


async def test_joining_a_dead_generation_recovers_it_and_tells_the_socket(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    plan = await _streamed_then_died(setup)
    async with chat(await adb(setup.token)()) as socket:
        await socket.send({"type": "conversation.join", "conversation_id": str(plan.conversation_id), "after": "0-0"})
        state = await socket.receive()
        events = await socket.receive_until("error")
        # The conversation is free again at once, not after a 15-minute lock.
        assert (await socket.turn("go on", conversation_id=str(plan.conversation_id)))[-1]["type"] == "message.completed"
    assert state["generating"] is False
    assert "".join(e["content"] for e in events if e["type"] == "delta") == "".join(DELTAS)
    assert events[-1]["message_id"] == str(plan.assistant_message_id)


async def test_a_turn_on_a_dead_generations_conversation_stores_it_first(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    plan = await _streamed_then_died(setup)
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("are you there?", conversation_id=str(plan.conversation_id))
    assert events[-1]["type"] == "message.completed"
    stored = [m async for m in Message.objects.filter(conversation_id=plan.conversation_id).order_by("seq")]
    assert [(m.role, m.status) for m in stored] == [
        ("user", "complete"), ("assistant", "incomplete"), ("user", "complete"), ("assistant", "complete")
    ]
    assert stored[1].content == "".join(DELTAS)


async def test_a_claim_from_before_heartbeats_is_swept_by_its_start(tenant_factory, sim):
    setup = await adb(tenant_factory)()
    plan = await _streamed_then_died(setup)
    await Conversation.objects.filter(pk=plan.conversation_id).aupdate(
        generation_beat_at=None, generation_started_at=timezone.now() - timedelta(minutes=5)
    )
    assert await recovery.generations_recover() == 1
    assert (await Message.objects.aget(pk=plan.assistant_message_id)).content == "".join(DELTAS)


async def test_every_running_generation_of_a_process_keeps_its_claim_fresh(tenant_factory, sim, settings):
    """The generations of a process beat together; one that ended stops beating."""
    settings.GENERATION_HEARTBEAT_SECONDS = 0.05
    setup = await adb(tenant_factory)()
    plans = [await adb(_claim)(setup) for _ in range(3)]
    for plan in plans:
        await adb(_heartbeat_stopped)(plan)
    beats = [asyncio.create_task(recovery.heartbeat(plan)) for plan in plans]
    await asyncio.sleep(0.5)
    beats[0].cancel()
    await asyncio.wait([beats[0]])
    await adb(_heartbeat_stopped)(plans[0])
    await asyncio.sleep(0.3)
    assert await adb(services.stale_generations)() == [(setup.tenant.pk, plans[0].conversation_id, plans[0].assistant_message_id)]
    for beat in beats[1:]:
        beat.cancel()
    await asyncio.wait(beats[1:])
