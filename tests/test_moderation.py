"""Moderation: tenant rules, the provider's /v1/moderations over real HTTP, how they combine,
actions, events, failing open, billing and caps, the review queue, the sentence splitter."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError

from billing.caps import Subject, cap_reserve, cap_settle
from billing.models import CapPeriod, ModelPrice, Reservation, SpendingCap, UsageRecord
from conversations.providers import provider_target
from llm.gateway import ProviderTarget, UpstreamError
from llm.moderation import MODERATION_MODEL, provider_check
from llm.tokens import count_text
from moderation.defaults import install_moderation_price
from moderation.models import ModerationEvent, ModerationPolicy
from moderation.rules import PATTERN_WINDOW_CHARS, nested_quantifier, patterns_validate
from moderation.sentences import SentenceSplitter
from moderation.services import (
    CLEAR,
    EventNotFound,
    ModerationContext,
    PolicySnapshot,
    Verdict,
    event_review,
    moderate,
    policy_for,
    policy_save,
    rules_check,
)
from tests.conftest import adb
from tests.factories import TenantSetup

pytestmark = pytest.mark.django_db(transaction=True)


@dataclass
class World:
    setup: TenantSetup
    policy: PolicySnapshot
    target: ProviderTarget
    subject: Subject

    async def check(self, text: str, direction: str = "input", **context) -> Verdict:
        return await moderate(
            policy=self.policy, direction=direction, text=text, target=self.target, subject=self.subject,
            context=ModerationContext(**context),
        )


def _world(tenant_factory, monthly_cap_usd: Decimal | None = None, **policy_fields) -> World:
    # Transactional tests flush the row the price migration made: put it back.
    install_moderation_price(ModelPrice)
    setup = tenant_factory(monthly_cap_usd=monthly_cap_usd)
    policy_save(tenant_id=setup.tenant.pk, **policy_fields)
    return World(
        setup=setup,
        policy=policy_for(tenant_id=setup.tenant.pk),
        target=provider_target(setup.assistant),
        subject=Subject(tenant_id=setup.tenant.pk, end_user_id=setup.end_user().pk),
    )


async def world(tenant_factory, **options) -> World:
    return await adb(_world)(tenant_factory, **options)


def _rules(terms=(), patterns=()) -> PolicySnapshot:
    """A snapshot built the way policy_for builds one, without the database."""
    from moderation.services import policy_snapshot

    return policy_snapshot(ModerationPolicy(tenant_id=1, blocked_terms=list(terms), blocked_patterns=list(patterns)))


# --- rules ----------------------------------------------------------------------------------


def test_terms_match_whole_words_case_insensitively():
    policy = _rules(terms=["Kill", "bad word", "c++"])

    hit = rules_check(policy=policy, text="I will KILL the process.")
    assert hit is not None and hit.kind == "term" and hit.matched == "Kill"
    assert hit.category == "blocked_term"
    assert rules_check(policy=policy, text="a BAD \n  Word here").matched == "bad word"
    assert rules_check(policy=policy, text="written in C++!").matched == "c++"
    for clean in ("a skilled worker", "he kills time", "badword", "bad wordy", "abc++"):
        assert rules_check(policy=policy, text=clean) is None, clean


def test_patterns_match_case_insensitively_and_terms_are_checked_first():
    policy = _rules(terms=["secret"], patterns=[r"\b\d{4}-\d{4}-\d{4}-\d{4}\b", r"order #\d+"])

    card = rules_check(policy=policy, text="my card is 1234-5678-9012-3456 ok")
    assert card.kind == "pattern" and card.matched == r"\b\d{4}-\d{4}-\d{4}-\d{4}\b"
    assert card.category == "blocked_pattern"
    assert rules_check(policy=policy, text="ORDER #42 please").matched == r"order #\d+"
    assert rules_check(policy=policy, text="secret ORDER #42").kind == "term"
    assert rules_check(policy=policy, text="nothing to see") is None


def test_patterns_see_the_whole_text_through_overlapping_windows():
    policy = _rules(patterns=[r"forbidden-thing"])
    filler = "x " * (PATTERN_WINDOW_CHARS * 3)
    straddling = filler[: PATTERN_WINDOW_CHARS - 5] + " forbidden-thing " + filler

    assert rules_check(policy=policy, text=filler + " forbidden-thing") is not None
    assert rules_check(policy=policy, text=straddling) is not None
    assert rules_check(policy=policy, text=filler) is None


def test_invalid_long_and_catastrophic_patterns_are_refused_on_save(tenant_factory):
    tenant_id = tenant_factory().tenant.pk
    for bad in (["(unclosed"], ["a" * 201], [r"(a+)+$"], [r"(\w+\s?)*!"], "not a list", [""]):
        with pytest.raises(ValidationError):
            policy_save(tenant_id=tenant_id, blocked_patterns=bad)
    with pytest.raises(ValidationError):
        policy_save(tenant_id=tenant_id, provider_categories=["violence", "violense"])
    with pytest.raises(ValidationError):
        policy_save(tenant_id=tenant_id, input_action="shout")
    with pytest.raises(ValidationError):
        policy_save(tenant_id=tenant_id, tenant_id_of_someone_else=2)
    assert not ModerationPolicy.objects.exists()  # nothing half-saved

    policy_save(tenant_id=tenant_id, blocked_patterns=[r"(\d{3}-)+\d{4}", r"[a-z]+@[a-z]+\.com"])
    assert ModerationPolicy.objects.get().blocked_patterns == [r"(\d{3}-)+\d{4}", r"[a-z]+@[a-z]+\.com"]


def test_nested_quantifier_heuristic():
    assert nested_quantifier(r"(a+)+") and nested_quantifier(r"(a{1,2})*") and nested_quantifier(r"(x(a*))+")
    assert not nested_quantifier(r"(\d{3}-)+") and not nested_quantifier(r"a+b*") and not nested_quantifier(r"(a|b)+")
    patterns_validate([r"\bfoo\b"])  # fine


def test_policy_for_is_one_query_and_none_without_a_policy(tenant_factory, django_assert_num_queries):
    setup = tenant_factory()
    other = tenant_factory()
    policy_save(tenant_id=setup.tenant.pk, blocked_terms=["kill"], use_provider=True)

    with django_assert_num_queries(1):
        policy = policy_for(tenant_id=setup.tenant.pk)
    assert policy.tenant_id == setup.tenant.pk and policy.terms == ("kill",) and policy.use_provider
    assert policy.notice == "This response was withheld by the content policy."
    assert policy_for(tenant_id=other.tenant.pk) is None


# --- the provider over HTTP ----------------------------------------------------------------


async def test_provider_check_flags_per_input_over_http(tenant_factory, sim):
    w = await world(tenant_factory)

    verdict = await provider_check(target=w.target, texts=["hello there", "Please KILL it", "hate-word and gore-word"])

    assert verdict.results == (
        frozenset(), frozenset({"violence"}), frozenset({"hate", "violence", "violence/graphic"})
    )
    assert verdict.flagged and verdict.categories == ("hate", "violence", "violence/graphic")
    assert sim.stats.moderations == 1
    assert sim.moderation_requests[-1] == {
        "model": MODERATION_MODEL, "input": ["hello there", "Please KILL it", "hate-word and gore-word"]
    }


async def test_provider_check_counts_only_the_chosen_categories(tenant_factory, sim):
    w = await world(tenant_factory)

    verdict = await provider_check(target=w.target, texts=["kill", "hate-word"], categories={"hate"})

    assert verdict.results == (frozenset(), frozenset({"hate"}))
    assert not (await provider_check(target=w.target, texts=["a calm sentence"])).flagged


async def test_provider_errors_are_mapped(tenant_factory, sim):
    w = await world(tenant_factory)
    sim.inject_moderation(status=503)

    with pytest.raises(UpstreamError) as caught:
        await provider_check(target=w.target, texts=["hello"])
    assert caught.value.status == 503 and caught.value.code == "upstream_error"


# --- how the checks combine ----------------------------------------------------------------


async def test_a_rules_hit_trips_without_calling_the_provider(tenant_factory, sim):
    w = await world(tenant_factory, blocked_terms=["forbidden"], use_provider=True)
    conversation_id, message_id = uuid.uuid4(), uuid.uuid4()

    verdict = await w.check("This is FORBIDDEN talk, and kill too.", conversation_id=conversation_id,
                            message_id=message_id)

    assert verdict.blocked and verdict.flagged and verdict.source == "rules"
    assert verdict.categories == ("blocked_term",)
    assert sim.stats.moderations == 0
    event = await ModerationEvent.objects.aget(pk=verdict.event_id)
    assert (event.tenant_id, event.direction, event.source) == (w.setup.tenant.pk, "input", "rules")
    assert event.action == "block"
    assert event.categories == ["blocked_term"] and event.matched == "forbidden"
    assert event.excerpt == "This is FORBIDDEN talk, and kill too."
    assert (event.conversation_id, event.message_id) == (conversation_id, message_id)
    assert event.end_user_id == w.subject.end_user_id
    assert not event.reviewed
    assert not await UsageRecord.objects.filter(kind="moderation").aexists()  # rules cost nothing


async def test_the_provider_alone_trips_and_records_its_categories(tenant_factory, sim):
    w = await world(tenant_factory, use_provider=True)

    verdict = await w.check("time to kill the gore-word")

    assert verdict.blocked and verdict.source == "provider"
    assert verdict.categories == ("violence", "violence/graphic")
    event = await ModerationEvent.objects.aget(pk=verdict.event_id)
    assert event.source == "provider" and event.categories == ["violence", "violence/graphic"]
    assert event.matched == "violence, violence/graphic"
    assert sim.stats.moderations == 1


async def test_clean_text_passes_rules_and_provider(tenant_factory, sim):
    w = await world(tenant_factory, blocked_terms=["forbidden"], use_provider=True)

    assert await w.check("a perfectly nice message") == CLEAR
    assert sim.stats.moderations == 1
    assert not await ModerationEvent.objects.aexists()


async def test_rules_only_policy_never_calls_the_provider(tenant_factory, sim):
    w = await world(tenant_factory, blocked_terms=["forbidden"])

    assert await w.check("kill hate-word selfharm-word") == CLEAR
    assert sim.stats.moderations == 0


async def test_nothing_runs_without_a_policy_or_when_the_direction_is_off(tenant_factory, sim):
    w = await world(tenant_factory, blocked_terms=["kill"], use_provider=True, check_output=False)

    assert await w.check("kill", direction="output") == CLEAR
    assert await moderate(policy=None, direction="input", text="kill", target=w.target, subject=w.subject,
                          context=ModerationContext()) == CLEAR
    assert await w.check("   \n ") == CLEAR
    assert sim.stats.moderations == 0
    assert not await ModerationEvent.objects.aexists() and not await UsageRecord.objects.aexists()


async def test_block_and_flag_follow_the_action_of_each_direction(tenant_factory, sim):
    w = await world(tenant_factory, blocked_terms=["forbidden"], input_action="block", output_action="flag")

    blocked = await w.check("forbidden", direction="input")
    flagged = await w.check("forbidden", direction="output")

    assert blocked.blocked and blocked.flagged
    assert not flagged.blocked and flagged.flagged and flagged.event_id is not None
    actions = {e.direction: e.action async for e in ModerationEvent.objects.all()}
    assert actions == {"input": "block", "output": "flag"}


async def test_the_event_keeps_the_first_500_characters(tenant_factory, sim):
    w = await world(tenant_factory, blocked_terms=["forbidden"])
    text = "forbidden " + "y" * 1000

    verdict = await w.check(text, direction="output")

    event = await ModerationEvent.objects.aget(pk=verdict.event_id)
    assert event.excerpt == text[:500] and event.direction == "output"


async def test_long_texts_are_checked_against_patterns_too(tenant_factory, sim):
    w = await world(tenant_factory, blocked_patterns=[r"needle-\d+"])

    verdict = await w.check("hay " * 5000 + "needle-42")

    assert verdict.blocked and verdict.categories == ("blocked_pattern",)


# --- the provider failing fails open -------------------------------------------------------


async def test_a_provider_error_fails_open_billed_and_logged(tenant_factory, sim, caplog):
    w = await world(tenant_factory, use_provider=True)
    sim.inject_moderation(status=500)

    with caplog.at_level(logging.WARNING, logger="moderation.services"):
        verdict = await w.check("kill")

    assert verdict == Verdict(provider_error="upstream_error")
    assert not await ModerationEvent.objects.aexists()
    record = await UsageRecord.objects.aget()
    assert (record.kind, record.outcome, record.prompt_tokens, record.cost_usd) == ("moderation", "error", 0, 0)
    assert "fell open" in caplog.text and "upstream_error" in caplog.text
    assert "kill" not in caplog.text  # never the checked text
    assert (await w.check("kill")).blocked  # the next call is answered again


async def test_a_hung_provider_times_out_and_fails_open(tenant_factory, sim, settings):
    settings.UPSTREAM_FIRST_TOKEN_TIMEOUT = 0.3
    w = await world(tenant_factory, use_provider=True, blocked_terms=["forbidden"])
    sim.inject_moderation(hang=True)

    assert (await w.check("kill")).provider_error == "upstream_timeout"
    record = await UsageRecord.objects.aget()
    assert record.outcome == "error" and record.prompt_tokens == count_text("kill", MODERATION_MODEL)
    assert (await w.check("forbidden")).blocked  # rules still apply whatever the provider does


async def test_no_provider_target_fails_open(tenant_factory, sim):
    w = await world(tenant_factory, use_provider=True)

    verdict = await moderate(policy=w.policy, direction="input", text="kill", target=None, subject=w.subject,
                             context=ModerationContext())

    assert verdict == Verdict(provider_error="no_provider") and sim.stats.moderations == 0


async def test_a_cancelled_check_is_billed_and_settled(tenant_factory, sim):
    w = await world(tenant_factory, use_provider=True, monthly_cap_usd=Decimal("5"))
    sim.inject_moderation(hang=True)

    task = asyncio.create_task(w.check("hello"))
    while sim.stats.moderations == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    record = await UsageRecord.objects.aget()
    assert record.outcome == "cancelled" and record.kind == "moderation"
    assert (await Reservation.objects.aget(call_id=record.call_id)).status == "settled"


# --- billing and caps ----------------------------------------------------------------------


async def test_each_provider_call_is_one_usage_record_settled_against_the_caps(tenant_factory, sim):
    w = await world(tenant_factory, use_provider=True, monthly_cap_usd=Decimal("5"))
    conversation_id, message_id = uuid.uuid4(), uuid.uuid4()

    await w.check("a calm question about gardening", conversation_id=conversation_id, message_id=message_id)
    await w.check("kill", direction="output")

    records = [r async for r in UsageRecord.objects.order_by("created_at")]
    assert len(records) == 2 == sim.stats.moderations
    first = records[0]
    assert (first.kind, first.model, first.outcome, first.cost_usd) == ("moderation", MODERATION_MODEL, "ok", 0)
    assert first.prompt_tokens == count_text("a calm question about gardening", MODERATION_MODEL)
    assert first.completion_tokens == 0 and first.estimated
    assert (first.tenant_id, first.end_user_id) == (w.setup.tenant.pk, w.subject.end_user_id)
    assert (first.conversation_id, first.message_id) == (conversation_id, message_id)
    assert first.call_id.startswith("mod-")
    reservations = [r async for r in Reservation.objects.all()]
    assert {r.call_id for r in reservations} == {r.call_id for r in records}
    assert all(r.status == "settled" and r.amount_usd == 0 and r.period_ids for r in reservations)


def _spend(subject: Subject, amount: Decimal) -> None:
    cap_settle(reservation=cap_reserve(subject=subject, amount=amount, call_id=f"chat-{uuid.uuid4()}"), actual=amount)


async def test_a_cap_spent_to_its_limit_still_admits_a_free_moderation_call(tenant_factory, sim):
    w = await world(tenant_factory, use_provider=True, monthly_cap_usd=Decimal("1"))
    await adb(_spend)(w.subject, Decimal("1"))

    assert (await w.check("kill")).blocked

    assert (await Reservation.objects.aget(call_id__startswith="mod-")).status == "settled"
    assert (await CapPeriod.objects.aget()).spent_usd == Decimal("1")


async def test_a_cap_spent_past_its_limit_still_admits_a_free_moderation_call_without_a_hold(tenant_factory, sim):
    w = await world(tenant_factory, use_provider=True, monthly_cap_usd=Decimal("1"))
    await adb(_spend)(w.subject, Decimal("1"))
    await SpendingCap.objects.all().aupdate(limit_usd=Decimal("0.5"))  # an admin lowered it

    verdict = await w.check("kill")

    assert verdict.blocked and verdict.provider_error is None and sim.stats.moderations == 1
    assert await UsageRecord.objects.filter(kind="moderation").acount() == 1
    assert not await Reservation.objects.filter(call_id__startswith="mod-").aexists()
    assert (await CapPeriod.objects.aget()).spent_usd == Decimal("1")


async def test_a_priced_moderation_call_that_does_not_fit_is_not_made(tenant_factory, sim):
    w = await world(tenant_factory, use_provider=True, monthly_cap_usd=Decimal("1"))
    await adb(_spend)(w.subject, Decimal("1"))
    await ModelPrice.objects.filter(model=MODERATION_MODEL).aupdate(input_per_million=Decimal("10"))

    verdict = await w.check("kill")

    assert verdict == Verdict(provider_error="spending_cap_exceeded")
    assert sim.stats.moderations == 0 and not await UsageRecord.objects.filter(kind="moderation").aexists()


async def test_a_missing_price_refuses_the_call_and_fails_open(tenant_factory, sim):
    w = await world(tenant_factory, use_provider=True)
    await ModelPrice.objects.filter(model=MODERATION_MODEL).adelete()

    assert await w.check("kill") == Verdict(provider_error="price_missing")
    assert sim.stats.moderations == 0


# --- review --------------------------------------------------------------------------------


def test_event_review_marks_once_and_only_in_its_tenant(tenant_factory, django_user_model):
    w = _world(tenant_factory, blocked_terms=["forbidden"])
    other = tenant_factory()
    verdict = asyncio.run(w.check("forbidden"))
    reviewer = django_user_model.objects.create_user(username="reviewer")
    later = django_user_model.objects.create_user(username="later")

    with pytest.raises(EventNotFound):
        event_review(event_id=verdict.event_id, tenant_id=other.tenant.pk, user=reviewer)
    with pytest.raises(EventNotFound):
        event_review(event_id="not-a-uuid", tenant_id=w.setup.tenant.pk, user=reviewer)
    assert not ModerationEvent.objects.get().reviewed

    event_review(event_id=verdict.event_id, tenant_id=w.setup.tenant.pk, user=reviewer)
    event_review(event_id=verdict.event_id, tenant_id=w.setup.tenant.pk, user=later)
    event = ModerationEvent.objects.get()
    assert event.reviewed and event.reviewed_by == reviewer and event.reviewed_at is not None


def test_events_and_policies_are_tenant_scoped(tenant_factory):
    a = _world(tenant_factory, blocked_terms=["forbidden"])
    b = _world(tenant_factory, blocked_terms=["other"])
    asyncio.run(a.check("forbidden"))

    assert ModerationEvent.objects.for_tenant(a.setup.tenant).count() == 1
    assert not ModerationEvent.objects.for_tenant(b.setup.tenant).exists()
    assert ModerationPolicy.objects.for_tenant(b.setup.tenant).get().blocked_terms == ["other"]


# --- sentences -----------------------------------------------------------------------------


def test_sentence_splitter_releases_whole_sentences_as_they_complete():
    splitter = SentenceSplitter()
    deltas = ["Pi is", " 3.", "14. Really", "! Is it", "? Yes", "\nA list:", "\n- one", " more"]

    fed = [splitter.feed(delta) for delta in deltas]

    assert fed == [[], [], ["Pi is 3.14. "], ["Really! "], ["Is it? "], ["Yes\n"], ["A list:\n"], []]
    assert splitter.flush() == "- one more"
    assert splitter.flush() == ""


def test_sentence_splitter_keeps_every_character_and_caps_its_buffer():
    splitter = SentenceSplitter()
    text = "Hello there. " + "word " * 400 + "end"
    pieces = []
    for start in range(0, len(text), 7):
        pieces += splitter.feed(text[start:start + 7])
    rest = splitter.flush()

    assert "".join(pieces) + rest == text
    assert pieces[0] == "Hello there. "
    assert all(len(piece) <= SentenceSplitter.MAX_CHARS for piece in pieces)
    assert all(piece.endswith(" ") for piece in pieces[1:])  # released at a space, not mid-word
