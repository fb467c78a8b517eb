"""Moderation in the chat path: blocked input never reaches the model, blocked output is
replaced for the end user and never replayed, flags are queued for review."""

from __future__ import annotations

from unittest.mock import ANY

import pytest

from billing.models import UsageRecord
from conversations.models import Message
from moderation.models import ModerationEvent
from moderation.services import policy_save
from tests.conftest import adb

pytestmark = pytest.mark.django_db(transaction=True)


async def _tenant(tenant_factory, **policy):
    setup = await adb(tenant_factory)()
    await adb(policy_save)(tenant_id=setup.tenant.pk, **policy)
    return setup


def _statuses(conversation_id):
    return list(Message.objects.filter(conversation_id=conversation_id).order_by("seq").values_list("role", "status"))


async def test_input_blocked_by_a_rule_never_reaches_the_model(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory, blocked_terms=["contraband"], input_action="block")
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("where can I buy Contraband today?")
    assert [e["type"] for e in events] == ["conversation", "message.accepted", "message.started", "error"]
    assert events[-1]["code"] == "moderation_blocked"
    assert sim.stats.requests == 0 and sim.stats.moderations == 0
    assert await adb(_statuses)(events[0]["id"]) == [("user", "blocked")]
    event = await adb(ModerationEvent.objects.get)(tenant=setup.tenant)
    assert (event.direction, event.source, event.action) == ("input", "rules", "block")
    assert "Contraband" in event.excerpt


async def test_input_blocked_by_the_provider(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory, use_provider=True, input_action="block")
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("I will kill the process")
    assert events[-1]["code"] == "moderation_blocked"
    assert sim.stats.moderations == 1 and sim.stats.requests == 0
    record = await adb(UsageRecord.objects.get)(tenant=setup.tenant)
    assert record.kind == "moderation" and record.model == "omni-moderation-latest"


async def test_a_rule_hit_skips_the_provider_call(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory, use_provider=True, blocked_terms=["contraband"], input_action="block")
    async with chat(await adb(setup.token)()) as socket:
        await socket.turn("contraband and kill")
    assert sim.stats.moderations == 0


async def test_flag_action_lets_the_turn_through_and_queues_it(tenant_factory, chat, sim):
    setup = await _tenant(tenant_factory, blocked_terms=["refund"], input_action="flag", check_output=False)
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("I want a refund")
    assert events[-1]["type"] == "message.completed"
    event = await adb(ModerationEvent.objects.get)(tenant=setup.tenant)
    assert event.action == "flag" and not event.reviewed


async def test_blocked_output_is_replaced_kept_for_review_and_never_replayed(tenant_factory, chat, sim):
    # The simulator's answer quotes the user ("You said: …"): a term there trips the output check.
    setup = await _tenant(
        tenant_factory, check_input=False, blocked_terms=["sesame"], output_action="block",
        notice="Withheld by policy.",
    )
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("say sesame please")
        conversation_id = events[0]["id"]
        assert events[-1] == {
            "type": "error", "code": "moderation_blocked", "message": "Withheld by policy.",
            "message_id": events[2]["message_id"], "offset": ANY, "request_id": ANY,  # the turn's (observability)
        }
        await socket.turn("next question", conversation_id=conversation_id)
    assert await adb(_statuses)(conversation_id) == [
        ("user", "complete"), ("assistant", "blocked"), ("user", "complete"), ("assistant", "complete"),
    ]
    stored = await adb(Message.objects.get)(conversation_id=conversation_id, seq=2)
    assert "sesame" in stored.content  # kept for review
    replayed = sim.requests[-1]["messages"]
    assert [m["role"] for m in replayed] == ["system", "user", "user"]  # the blocked answer is not sent back
    event = await adb(ModerationEvent.objects.get)(tenant=setup.tenant)
    assert event.direction == "output" and str(event.message_id) == events[2]["message_id"]


async def test_no_policy_checks_nothing(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("contraband kill")
    assert events[-1]["type"] == "message.completed" and sim.stats.moderations == 0


async def test_sentence_checks_stop_the_stream_before_a_blocked_sentence_is_sent(tenant_factory, chat, sim):
    setup = await _tenant(
        tenant_factory, check_input=False, blocked_terms=["sesame"], output_action="block",
        stream_check_sentences=True, notice="Withheld.",
    )
    async with chat(await adb(setup.token)()) as socket:
        clean = await socket.turn("hello there")
        events = await socket.turn("say sesame please", conversation_id=clean[0]["id"])
    # Clean answers still stream, a sentence at a time.
    assert clean[-1]["type"] == "message.completed"
    assert "".join(e["content"] for e in clean if e["type"] == "delta").startswith("You said: hello there.")
    # The first sentence quotes the blocked term: nothing of it reaches the socket.
    assert not any(e["type"] == "delta" for e in events)
    assert events[-1]["code"] == "moderation_blocked" and events[-1]["message"] == "Withheld."
    stored = await adb(Message.objects.get)(conversation_id=clean[0]["id"], seq=4)
    assert stored.status == "blocked" and "sesame" in stored.content


async def test_sentence_checks_send_the_whole_answer_including_its_last_unfinished_sentence(tenant_factory, chat, sim):
    """The gate releases what is left when the stream ends: an answer whose last sentence has
    no trailing whitespace still reaches the socket and the stored message whole."""
    plain = await _tenant(tenant_factory, check_input=False, blocked_terms=["sesame"], output_action="block")
    checked = await _tenant(
        tenant_factory, check_input=False, blocked_terms=["sesame"], output_action="block",
        stream_check_sentences=True,
    )
    answers = []
    for setup in (plain, checked):
        async with chat(await adb(setup.token)()) as socket:
            events = await socket.turn("hello there")
        assert events[-1]["type"] == "message.completed"
        streamed = "".join(e["content"] for e in events if e["type"] == "delta")
        stored = await adb(Message.objects.get)(conversation_id=events[0]["id"], seq=2)
        assert stored.content == streamed
        answers.append(streamed)
    assert answers[1] == answers[0] and answers[0].rstrip() == answers[0]
