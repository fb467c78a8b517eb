"""The response cache on chat turns: a repeated first question is answered from the stored
answer (no completion call, a $0 `cached` ledger row with the saving), strictly per tenant and
per assistant version, semantically through the simulator's embeddings, never for a blocked
question or a conversation's later messages, and not past its TTL."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import httpx2
import pytest
from django.utils import timezone

from billing.models import ModelPrice, UsageRecord
from billing.services import price_for
from conversations.models import Assistant, Message
from moderation.services import policy_save
from responsecache.defaults import install_embedding_price
from responsecache.models import CachedAnswer
from tests.conftest import adb

pytestmark = pytest.mark.django_db(transaction=True)

FAQ = "How do I reset my password?"


def _cached_setup(tenant_factory, mode: str = "exact", **options):
    install_embedding_price(ModelPrice)  # transactional tests flush what the migration made
    setup = tenant_factory(**options)
    Assistant.objects.filter(pk=setup.assistant.pk).update(response_cache=mode, response_cache_ttl=3600)
    setup.assistant.refresh_from_db()
    return setup


def _text(events) -> str:
    return "".join(e["content"] for e in events if e["type"] == "delta")


def _ledger(tenant) -> list[UsageRecord]:
    return list(UsageRecord.objects.filter(tenant=tenant).order_by("created_at"))


async def _ask(chat, token: str, question: str, **fields) -> list[dict]:
    async with chat(token) as socket:
        return await socket.turn(question, **fields)


async def test_a_repeated_faq_is_answered_from_the_cache_at_no_cost(tenant_factory, chat, sim):
    setup = await adb(_cached_setup)(tenant_factory)
    token = await adb(setup.token)()
    first = await _ask(chat, token, FAQ)
    assert first[-1]["type"] == "message.completed" and "cached" not in first[-1]
    assert sim.stats.completions == 1

    again = await _ask(chat, token, "  how do i RESET my password ")  # the same, normalised

    assert sim.stats.completions == 1  # no second completion call
    types = [e["type"] for e in again]
    assert types[:3] == ["conversation", "message.accepted", "message.started"]
    assert set(types[3:-1]) == {"delta"} and types[-1] == "message.completed"
    completed = again[-1]
    assert completed["cached"] is True and completed["cost_usd"] == "0" and completed["finish_reason"] == "stop"
    assert _text(again) == _text(first)

    answer = await Message.objects.aget(id=completed["message_id"])
    assert answer.cached and answer.status == "complete" and answer.content == _text(first)
    chat_row, cached_row = await adb(_ledger)(setup.tenant)
    assert (chat_row.kind, cached_row.kind) == ("chat", "cached")
    assert cached_row.cost_usd == 0 and cached_row.message_id == answer.id
    assert cached_row.completion_tokens == chat_row.completion_tokens == completed["usage"]["completion_tokens"]
    price = await adb(price_for)(setup.assistant.model)
    saved = price.cost(prompt_tokens=cached_row.prompt_tokens, completion_tokens=cached_row.completion_tokens)
    assert cached_row.saved_response_cache_usd == saved > 0
    entry = await CachedAnswer.objects.aget(tenant=setup.tenant)
    assert entry.hits == 1 and entry.question == "how do i reset my password"


async def test_another_tenants_identical_question_is_a_miss(tenant_factory, chat, sim):
    one = await adb(_cached_setup)(tenant_factory)
    two = await adb(_cached_setup)(tenant_factory)
    await _ask(chat, await adb(one.token)(), FAQ)
    other = await _ask(chat, await adb(two.token)(), FAQ)

    assert sim.stats.completions == 2
    assert "cached" not in other[-1]
    assert [r.kind for r in await adb(_ledger)(two.tenant)] == ["chat"]


async def test_a_second_message_in_a_conversation_never_hits(tenant_factory, chat, sim):
    setup = await adb(_cached_setup)(tenant_factory)
    token = await adb(setup.token)()
    await _ask(chat, token, FAQ)
    async with chat(token) as socket:
        opening = await socket.turn("Hello")
        later = await socket.turn(FAQ, conversation_id=opening[0]["id"])

    assert "cached" not in later[-1] and sim.stats.completions == 3
    assert not await CachedAnswer.objects.filter(question="how do i reset my password", hits__gt=0).aexists()


async def test_editing_the_assistant_invalidates_its_answers(tenant_factory, chat, sim):
    setup = await adb(_cached_setup)(tenant_factory)
    token = await adb(setup.token)()
    await _ask(chat, token, FAQ)
    assistant = await Assistant.objects.aget(pk=setup.assistant.pk)
    assistant.system_prompt = "You are a terse support agent."
    await assistant.asave()  # the admin's save: the configuration version moves

    after = await _ask(chat, token, FAQ)
    assert "cached" not in after[-1] and sim.stats.completions == 2
    again = await _ask(chat, token, FAQ)  # the new version's answer is cached in turn
    assert again[-1]["cached"] is True and sim.stats.completions == 2
    assert await CachedAnswer.objects.filter(tenant=setup.tenant).acount() == 2


async def test_an_expired_answer_is_not_used(tenant_factory, chat, sim):
    setup = await adb(_cached_setup)(tenant_factory)
    token = await adb(setup.token)()
    await _ask(chat, token, FAQ)
    await CachedAnswer.objects.filter(tenant=setup.tenant).aupdate(expires_at=timezone.now() - timedelta(seconds=1))

    after = await _ask(chat, token, FAQ)
    assert "cached" not in after[-1] and sim.stats.completions == 2
    entry = await CachedAnswer.objects.aget(tenant=setup.tenant)  # replaced by the fresh answer
    assert entry.expires_at > timezone.now() + timedelta(seconds=3500) and entry.hits == 0


async def test_a_blocked_question_never_hits(tenant_factory, chat, sim):
    setup = await adb(_cached_setup)(tenant_factory)
    token = await adb(setup.token)()
    question = "How do I reset my forbidden password?"
    await _ask(chat, token, question)
    await adb(policy_save)(tenant_id=setup.tenant.pk, blocked_terms=["forbidden"])

    blocked = await _ask(chat, token, question)
    assert blocked[-1] == {**blocked[-1], "type": "error", "code": "moderation_blocked"}
    assert sim.stats.completions == 1
    assert not any(e["type"] == "delta" for e in blocked)
    assert [r.kind for r in await adb(_ledger)(setup.tenant)] == ["chat"]
    assert (await CachedAnswer.objects.aget(tenant=setup.tenant)).hits == 0


async def test_an_assistant_with_tools_or_the_cache_off_is_never_cached(tenant_factory, chat, sim):
    setup = await adb(_cached_setup)(tenant_factory, tools=["current_time"])
    off = await adb(tenant_factory)()
    for tenant_setup in (setup, off):
        token = await adb(tenant_setup.token)()
        await _ask(chat, token, FAQ)
        await _ask(chat, token, FAQ)
    assert not await CachedAnswer.objects.aexists()
    assert not await UsageRecord.objects.filter(kind="cached").aexists()


async def test_a_semantic_paraphrase_hits_and_an_unrelated_question_does_not(tenant_factory, chat, sim):
    setup = await adb(_cached_setup)(tenant_factory, mode="semantic")
    token = await adb(setup.token)()
    first = await _ask(chat, token, FAQ)
    assert sim.stats.embeddings == 1

    paraphrase = await _ask(chat, token, "how can I reset my passwords, please")
    assert paraphrase[-1]["cached"] is True and _text(paraphrase) == _text(first)
    unrelated = await _ask(chat, token, "What are your opening hours on Sunday?")
    assert "cached" not in unrelated[-1]

    assert sim.stats.completions == 2 and sim.stats.embeddings == 3
    rows = await adb(_ledger)(setup.tenant)
    assert [r.kind for r in rows] == ["embedding", "chat", "embedding", "cached", "embedding", "chat"]
    embedding = rows[0]
    assert embedding.model == "text-embedding-3-small" and embedding.prompt_tokens > 0 and not embedding.estimated
    assert embedding.cost_usd == Decimal("0.02") * embedding.prompt_tokens / 1_000_000
    assert await CachedAnswer.objects.filter(tenant=setup.tenant, kind="semantic").acount() == 2


async def test_semantic_lookups_without_an_embedding_price_fall_back_to_exact(tenant_factory, chat, sim):
    setup = await adb(_cached_setup)(tenant_factory, mode="semantic")
    await ModelPrice.objects.filter(kind="embedding").adelete()
    token = await adb(setup.token)()
    await _ask(chat, token, FAQ)
    exact = await _ask(chat, token, FAQ.lower())
    paraphrase = await _ask(chat, token, "how can I reset my passwords, please")

    assert exact[-1]["cached"] is True and "cached" not in paraphrase[-1]
    assert sim.stats.embeddings == 0 and sim.stats.completions == 2


def test_rest_replies_and_event_streams_carry_the_cached_marker(parley, tenant_factory, sim):
    setup = _cached_setup(tenant_factory)
    with httpx2.Client(base_url=parley.url, headers={"Authorization": f"Bearer {setup.api_key}"}, timeout=15) as http:
        replies = []
        for _ in range(2):
            conversation_id = http.post("/api/v1/conversations/", json={}).json()["id"]
            replies.append(http.post(f"/api/v1/conversations/{conversation_id}/messages/", json={"content": FAQ}).json())
        conversation_id = http.post("/api/v1/conversations/", json={}).json()["id"]
        with http.stream("POST", f"/api/v1/conversations/{conversation_id}/messages/",
                         json={"content": FAQ, "stream": True}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]

    assert [reply["cached"] for reply in replies] == [False, True]
    assert replies[1]["content"] == replies[0]["content"] and replies[1]["status"] == "complete"
    assert events[-1]["type"] == "message.completed" and events[-1]["cached"] is True
    assert "".join(e["content"] for e in events if e["type"] == "delta") == replies[0]["content"]
    assert sim.stats.completions == 1
    assert [r.kind for r in _ledger(setup.tenant)] == ["chat", "cached", "cached"]


@pytest.mark.django_db
def test_a_semantic_hit_needs_the_same_numbers(tenant_factory):
    """Questions that differ only in an order number embed almost alike; one customer's answer
    must never reach another (bench/cost_levers.py saw 1.5% such wrong hits before)."""
    from responsecache.keys import question_numbers, vector_pack
    from responsecache.store import answer_find_similar

    setup = tenant_factory()
    vector = tuple([1.0] + [0.0] * 31)
    CachedAnswer.objects.create(
        tenant=setup.tenant, assistant_id=setup.assistant.pk, scope="a1.v", kind=CachedAnswer.Kind.SEMANTIC,
        key="k1041", question="Where is my order #1041?", embedding=vector_pack(vector),
        answer="Order 1041 ships today.", model="gpt-4o-mini", expires_at=timezone.now() + timedelta(hours=1),
    )
    assert question_numbers("Where is my order #1041?") == ("1041",)
    find = dict(tenant_id=setup.tenant.pk, scope="a1.v", vector=vector)
    assert answer_find_similar(**find, question="where's order 1042, please") is None
    assert answer_find_similar(**find, question="my order") is None
    hit = answer_find_similar(**find, question="where is order 1041 please")
    assert hit is not None and hit.answer == "Order 1041 ships today."


@pytest.mark.django_db
def test_a_semantic_hit_needs_the_same_thing_asked_about(tenant_factory):
    """Questions that differ in one product embed almost alike; the answer about one is wrong
    for the other (bench/cost_levers.py served 6 of 600 complex questions another's answer).
    A paraphrase that only adds or drops words still hits."""
    from responsecache.keys import question_terms, vector_pack
    from responsecache.store import answer_find_similar

    setup = tenant_factory()
    vector = tuple([1.0] + [0.0] * 31)
    CachedAnswer.objects.create(
        tenant=setup.tenant, assistant_id=setup.assistant.pk, scope="a1.v", kind=CachedAnswer.Kind.SEMANTIC,
        key="kplans", question="explain the difference between your two monitor plans step by step",
        embedding=vector_pack(vector), answer="The two monitor plans differ in…", model="gpt-4o-mini",
        expires_at=timezone.now() + timedelta(hours=1),
    )
    assert question_terms("How can I reset my passwords, please?") == {"reset", "password"}
    find = dict(tenant_id=setup.tenant.pk, scope="a1.v", vector=vector)
    assert answer_find_similar(**find, question="Explain the difference between your two keyboard plans step by step") is None
    assert answer_find_similar(**find, question="Explain the difference between your two monitor warranties") is None
    assert answer_find_similar(**find, question="The difference between your two monitors' plans?") is not None
    hit = answer_find_similar(**find, question="Can you explain the difference between your two monitor plans, step by step?")
    assert hit is not None and hit.answer.startswith("The two monitor plans")


async def test_the_cache_is_asked_before_a_classifier_route_grades_the_question(tenant_factory, chat, sim):
    """A question the cache answers costs no grading call; a miss embeds the question once
    (the lookup before grading goes on to the generation) and is graded as before."""
    setup = await adb(_cached_setup)(tenant_factory, mode="semantic")
    setup.assistant.model = "gpt-4o"
    setup.assistant.routes = [{"name": "graded", "model": "gpt-4o-mini",
                               "when": {"classifier": {"model": "gpt-4o-mini", "label": "simple"}}}]
    await adb(setup.assistant.save)()
    token = await adb(setup.token)()

    first = await _ask(chat, token, FAQ)  # a miss: embedded once, graded, answered
    assert "cached" not in first[-1]
    assert (sim.stats.embeddings, sim.stats.completions) == (1, 2)  # the grade and the answer
    paraphrase = await _ask(chat, token, "how can I reset my passwords, please")
    assert paraphrase[-1]["cached"] is True and _text(paraphrase) == _text(first)
    assert (sim.stats.embeddings, sim.stats.completions) == (2, 2)  # no grading call for a hit

    rows = await adb(_ledger)(setup.tenant)
    assert [(r.kind, r.call_id.split("-")[0]) for r in rows] == [
        ("embedding", "emb"), ("chat", "grade"), ("chat", "msg"), ("embedding", "emb"), ("cached", "cache")]
    assert rows[2].model == "gpt-4o-mini"  # graded simple: routed to the cheap model
    # A hit needs no model chosen: its saving is booked against the model asked for, and its
    # message names the model that wrote the answer it serves.
    hit = await Message.objects.aget(id=paraphrase[-1]["message_id"])
    assert hit.cached and (hit.model, hit.route) == ("gpt-4o-mini", "") and rows[4].model == "gpt-4o"
    # Every call is booked to its turn's conversation, those made before it was stored included.
    opened = [first[0]["id"], paraphrase[0]["id"]]
    assert [str(r.conversation_id) for r in rows] == [opened[0]] * 3 + [opened[1]] * 2
