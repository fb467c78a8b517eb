"""Long conversations: token budgets, tool groups at the cut, strategies, summaries."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from billing.models import UsageRecord
from conversations import answers, summaries, turns
from conversations.context import SUMMARY_PREAMBLE, _Window, history_budget, prompt_assemble
from conversations.gatekeepers import Caller
from conversations.models import Conversation, Message
from conversations.tasks import summarize_conversation
from llm.gateway import UpstreamError, Usage
from llm.tokens import count_message

pytestmark = pytest.mark.django_db(transaction=True)


def _conversation(setup, **assistant_fields) -> Conversation:
    for name, value in assistant_fields.items():
        setattr(setup.assistant, name, value)
    setup.assistant.save()
    return Conversation.objects.create(tenant=setup.tenant, assistant=setup.assistant, end_user=setup.end_user())


def _add(conversation: Conversation, role: str, content: str = "", *, tool_calls=None, tool_call_id="", tokens=None):
    conversation.last_seq += 1
    conversation.save(update_fields=["last_seq"])
    message = {"role": role, "content": content}
    return Message.objects.create(
        tenant=conversation.tenant, conversation=conversation, seq=conversation.last_seq, role=role,
        content=content, tool_calls=tool_calls, tool_call_id=tool_call_id,
        tokens=tokens if tokens is not None else count_message(message, "gpt-4o-mini"),
    )


def _call(call_id: str, name: str = "calculator") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


# --- budgets ----------------------------------------------------------------------------


def _offer_all(window: _Window, rows: list[tuple]) -> list[dict]:
    for row in reversed(rows):  # newest first, as read from the database
        window.offer(row)
        if window.full:
            break
    return window.messages()


def test_window_exactly_full_keeps_everything_and_one_token_over_drops_the_oldest():
    rows = [("user", "a", None, "", 10), ("assistant", "b", None, "", 10), ("user", "c", None, "", 10)]
    assert [m["content"] for m in _offer_all(_Window(30), rows)] == ["a", "b", "c"]
    assert [m["content"] for m in _offer_all(_Window(29), rows)] == ["b", "c"]


def test_a_huge_single_message_is_not_sent_and_nothing_older_sneaks_in():
    rows = [("user", "old", None, "", 5), ("user", "huge", None, "", 1_000_000)]
    window = _Window(100)
    assert _offer_all(window, rows) == [] and window.full


def test_tool_call_and_results_are_kept_or_dropped_together():
    rows = [
        ("user", "what is 2+2 and the time?", None, "", 10),
        ("assistant", "", [_call("c1"), _call("c2", "current_time")], "", 20),
        ("tool", "4", None, "c1", 5),
        ("tool", "noon", None, "c2", 5),
        ("assistant", "4, at noon", None, "", 10),
    ]
    whole = _offer_all(_Window(40), rows)
    assert [m["role"] for m in whole] == ["assistant", "tool", "tool", "assistant"]
    assert whole[0]["content"] is None and whole[0]["tool_calls"][0]["id"] == "c1"
    # One token short of the whole group: the group goes, never half of it.
    assert [m["role"] for m in _offer_all(_Window(39), rows)] == ["assistant"]


def test_orphaned_tool_results_and_unanswered_calls_are_never_replayed():
    rows = [
        ("user", "q", None, "", 5),
        ("tool", "stray", None, "gone", 5),
        ("user", "again", None, "", 5),
        ("assistant", "", [_call("c9")], "", 5),  # the turn was cut before results were stored
    ]
    assert [(m["role"], m["content"]) for m in _offer_all(_Window(100), rows)] == [("user", "q"), ("user", "again")]


def test_budget_leaves_room_for_reply_prefix_tools_and_margin(tenant_factory):
    setup = tenant_factory()
    setup.assistant.max_tokens = 1000
    assert history_budget(assistant=setup.assistant, context_window=16_000, fixed_tokens=500) == 16_000 - 1000 - 500 - 3 - 64
    setup.assistant.history_strategy = "window"
    setup.assistant.history_window_tokens = 700
    assert history_budget(assistant=setup.assistant, context_window=16_000, fixed_tokens=500) == 700


def test_prompt_fits_the_window_and_keeps_the_system_prompt(tenant_factory):
    setup = tenant_factory()
    conversation = _conversation(setup, max_tokens=100, history_strategy="full", system_prompt="Be brief.")
    for i in range(300):
        _add(conversation, "user" if i % 2 == 0 else "assistant", f"message number {i} " + "word " * 20)
    prompt = prompt_assemble(conversation=conversation, assistant=setup.assistant, context_window=2_000)
    assert prompt.messages[0] == {"role": "system", "content": "Be brief."}
    assert prompt.truncated and prompt.tokens <= 2_000 - 100
    assert prompt.messages[-1]["content"].startswith("message number 299 ")
    assert prompt.tokens + 100 + 64 > 2_000 - 60  # and it uses the room it has


def test_sliding_window_strategy_uses_its_own_budget(tenant_factory):
    setup = tenant_factory()
    conversation = _conversation(setup, history_strategy="window", history_window_tokens=200)
    for i in range(40):
        _add(conversation, "user", f"turn {i} " + "word " * 10)
    prompt = prompt_assemble(conversation=conversation, assistant=setup.assistant, context_window=128_000)
    assert prompt.history_tokens <= 200 and prompt.truncated


def test_summary_strategy_sends_summary_then_messages_after_it(tenant_factory):
    setup = tenant_factory()
    conversation = _conversation(setup)
    for i in range(6):
        _add(conversation, "user" if i % 2 == 0 else "assistant", f"m{i}")
    Conversation.objects.filter(pk=conversation.pk).update(summary="They talked about m0 to m3.", summary_through_seq=4)
    conversation.refresh_from_db()
    prompt = prompt_assemble(conversation=conversation, assistant=setup.assistant, context_window=128_000)
    assert prompt.messages[1] == {"role": "system", "content": SUMMARY_PREAMBLE + "They talked about m0 to m3."}
    assert [m["content"] for m in prompt.messages[2:]] == ["m4", "m5"]


# --- summaries -----------------------------------------------------------------------------


def _long(setup, turns: int = 30, **fields) -> Conversation:
    conversation = _conversation(
        setup, summary_high_water_tokens=300, summary_low_water_tokens=100, **fields
    )
    for i in range(turns):
        _add(conversation, "user", f"user says fact number {i} " + "detail " * 8)
        _add(conversation, "assistant", f"assistant notes fact {i}")
    return conversation


def test_summary_compacts_down_to_the_low_water_mark_and_is_billed(tenant_factory, sim):
    setup = tenant_factory()
    conversation = _long(setup)
    assert summaries.conversation_summarize(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)

    conversation.refresh_from_db()
    assert conversation.summary and conversation.summary_claimed_until is None
    kept = Message.objects.filter(conversation=conversation, seq__gt=conversation.summary_through_seq)
    assert sum(kept.values_list("tokens", flat=True)) <= 100
    assert kept.order_by("seq").first().role == "user"  # the cut falls on a turn boundary
    record = UsageRecord.objects.get(kind="summary")
    assert record.model == "gpt-4o-mini" and record.cost_usd > 0
    assert "user says fact number 0" in sim.requests[-1]["messages"][1]["content"]
    # Incremental: the next compaction includes the previous summary, not the old messages.
    for i in range(30, 40):
        _add(conversation, "user", f"user says fact number {i} " + "detail " * 8)
    assert summaries.conversation_summarize(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)
    sent = sim.requests[-1]["messages"][1]["content"]
    assert sent.startswith("Previous summary:") and "fact number 0 " not in sent.split("New messages:")[1]


def test_only_one_summary_runs_at_a_time(tenant_factory, sim):
    setup = tenant_factory()
    conversation = _long(setup)
    assert summaries.summary_claim(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)
    assert not summaries.conversation_summarize(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)
    assert sim.stats.requests == 0
    # A claim left by a killed worker expires.
    Conversation.objects.filter(pk=conversation.pk).update(summary_claimed_until=timezone.now() - timedelta(seconds=1))
    assert summaries.conversation_summarize(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)


def test_a_failing_summary_is_retried_and_leaves_the_previous_summary(tenant_factory, sim):
    setup = tenant_factory()
    conversation = _long(setup)
    Conversation.objects.filter(pk=conversation.pk).update(summary="earlier summary", summary_through_seq=2)
    sim.inject(status=500, times=10)
    with pytest.raises(UpstreamError):
        summaries.conversation_summarize(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)
    conversation.refresh_from_db()
    assert (conversation.summary, conversation.summary_through_seq) == ("earlier summary", 2)
    assert conversation.summary_claimed_until is None  # released for the retry
    assert UsageRecord.objects.get(kind="summary").cost_usd == 0  # refused calls cost nothing
    # The task retries on upstream errors.
    assert UpstreamError in summarize_conversation.autoretry_for and summarize_conversation.max_retries == 5
    sim.reset()
    assert summaries.conversation_summarize(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)


def test_a_summary_killed_halfway_writes_nothing(tenant_factory, sim, monkeypatch):
    setup = tenant_factory()
    conversation = _long(setup)

    def killed(**kwargs):
        raise SystemExit("worker killed")

    monkeypatch.setattr(summaries, "summary_store", killed)
    with pytest.raises(SystemExit):
        summaries.conversation_summarize(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)
    conversation.refresh_from_db()
    assert conversation.summary == "" and conversation.summary_through_seq == 0


def test_a_stale_summary_does_not_overwrite_a_newer_one(tenant_factory, sim):
    setup = tenant_factory()
    conversation = _long(setup)
    job = summaries.summary_plan(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)
    Conversation.objects.filter(pk=conversation.pk).update(summary="newer", summary_through_seq=10)
    assert not summaries.summary_store(job=job, text="older")
    assert Conversation.objects.get(pk=conversation.pk).summary == "newer"


async def test_chat_keeps_working_while_summaries_fail(tenant_factory, chat, sim, monkeypatch):
    from tests.conftest import adb

    setup = await adb(tenant_factory)()
    conversation = await adb(_long)(setup, turns=30, max_tokens=50)
    failures = []

    def failing_enqueue(**kwargs):
        failures.append(kwargs)
        raise UpstreamError("summary model down")

    monkeypatch.setattr(summaries, "summary_enqueue", failing_enqueue)
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("still here?", conversation_id=str(conversation.pk))
        assert events[-1]["type"] == "message.completed"
        events = await socket.turn("and now?", conversation_id=str(conversation.pk))
        assert events[-1]["type"] == "message.completed"
    assert len(failures) == 2  # the summary was due both times and failed both times


def test_a_turn_enqueues_a_summary_past_the_high_water_mark(tenant_factory, sim, monkeypatch):

    setup = tenant_factory()
    conversation = _long(setup, turns=30)
    plan = turns.turn_prepare(
        caller=Caller(tenant_id=setup.tenant.pk, end_user_id=conversation.end_user_id), content="next",
        conversation_id=conversation.pk, assistant_slug=None, client_msg_id=None, control_channel="t",
    )
    assert plan.summary_due
    enqueued = []
    monkeypatch.setattr(summarize_conversation, "delay", lambda *args: enqueued.append(args))
    summaries.summary_enqueue(tenant_id=setup.tenant.pk, conversation_id=conversation.pk)
    assert enqueued == [(setup.tenant.pk, str(conversation.pk))]


def test_queries_per_turn_do_not_grow_with_history(tenant_factory, django_assert_max_num_queries):
    from conversations.answers import TurnOutcome

    setup = tenant_factory()
    conversation = _conversation(setup, history_strategy="full")
    Message.objects.bulk_create(
        Message(
            tenant=setup.tenant, conversation=conversation, seq=i + 1, role="user" if i % 2 == 0 else "assistant",
            content=f"message {i}", tokens=8,
        )
        for i in range(2000)
    )
    Conversation.objects.filter(pk=conversation.pk).update(last_seq=2000)
    caller = Caller(tenant_id=setup.tenant.pk, end_user_id=conversation.end_user_id)
    setup.assistant.history_window_tokens = 400
    setup.assistant.history_strategy = "window"
    setup.assistant.save()
    with django_assert_max_num_queries(20):
        plan = turns.turn_prepare(
            caller=caller, content="hello", conversation_id=conversation.pk,
            assistant_slug=None, client_msg_id=None, control_channel="t",
        )
        answers.turn_finish(
            plan=plan,
            outcome=TurnOutcome(
                called_upstream=True, content="hi", status="complete", finish_reason="stop",
                usage=Usage(prompt_tokens=10, completion_tokens=2, cached_tokens=0), latency_ms=1, ttft_ms=1,
            ),
        )
    assert plan.prompt.history_messages <= 60


def test_unknown_conversation_summary_is_refused(tenant_factory):
    setup = tenant_factory()
    assert not summaries.summary_claim(tenant_id=setup.tenant.pk, conversation_id=uuid.uuid4())


def test_compaction_happens_when_it_pays_and_never_past_the_high_water_mark(tenant_factory):
    from decimal import Decimal

    from billing.services import Price

    setup = tenant_factory()
    assistant = setup.assistant  # defaults: summarise, low water 1500, high water 16000
    cheap_cache = Price("m", Decimal("0.30"), Decimal("0.03"), Decimal("1.20"), 128_000)  # 90% off
    half_cache = Price("m", Decimal("0.30"), Decimal("0.15"), Decimal("1.20"), 128_000)  # 50% off

    def due(tokens: int, turns: int, price: Price) -> bool:
        return summaries.summary_needed(
            assistant=assistant, history_tokens=tokens, truncated=False, turns=turns, price=price
        )

    assert not due(2_400, 5, half_cache)  # too little to gain
    assert not due(3_000, 20, half_cache)  # a short conversation: the summary would not pay back
    assert due(6_000, 60, half_cache)  # a long one: compact well before the high-water mark
    assert not due(6_000, 60, cheap_cache)  # carrying cached history is cheap at 90% off
    assert due(16_001, 2, cheap_cache)  # the hard bound holds whatever the prices
    assistant.history_strategy = "full"
    assert not due(100_000, 500, half_cache)


# --- a turn's prompt is read before its conversation is locked ----------------------------


def test_a_prompt_with_the_unsaved_message_is_the_prompt_after_saving_it(tenant_factory):
    setup = tenant_factory()
    conversation = _conversation(setup, history_strategy="window", history_window_tokens=60)
    for i in range(12):
        _add(conversation, "user" if i % 2 == 0 else "assistant", f"message number {i}")
    content = "and the newest one"
    newest = Message(role="user", content=content, tokens=count_message({"role": "user", "content": content}, "gpt-4o-mini"))
    before = prompt_assemble(conversation=conversation, assistant=setup.assistant, context_window=128_000, newest=newest)
    _add(conversation, "user", content)
    after = prompt_assemble(conversation=conversation, assistant=setup.assistant, context_window=128_000)
    assert before == after and after.truncated and after.messages[-1]["content"] == content


def test_a_turn_sends_what_was_stored_while_it_was_being_admitted(tenant_factory, monkeypatch):
    """Another answer lands between the turn's admission (prompt read, limits counted) and its
    lock: the prompt sent is read again under the lock and carries that answer."""

    setup = tenant_factory()
    conversation = _conversation(setup)
    _add(conversation, "user", "first question")
    counted = turns.ratelimits.rate_limits_acquire_reading

    def an_answer_lands(checks, **kwargs):
        _add(Conversation.objects.get(pk=conversation.pk), "assistant", "the answer that landed meanwhile")
        return counted(checks, **kwargs)

    monkeypatch.setattr(turns.ratelimits, "rate_limits_acquire_reading", an_answer_lands)
    plan = turns.turn_prepare(
        caller=Caller(tenant_id=setup.tenant.pk, end_user_id=conversation.end_user_id), content="second question",
        conversation_id=conversation.pk, assistant_slug=None, client_msg_id=None, control_channel="c",
    )
    contents = [m["content"] for m in plan.request.messages if m["role"] != "system"]
    assert contents == ["first question", "the answer that landed meanwhile", "second question"]
    assert plan.user_seq == 3
