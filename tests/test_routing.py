"""Routing through the chat turn and `/v1` aliases, against the simulator, checked in the ledger."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest

from billing.models import UsageRecord
from billing.services import price_for
from conversations.models import Message
from routing.models import ModelAlias
from tests.conftest import adb

pytestmark = pytest.mark.django_db(transaction=True)

STRONG, CHEAP = "gpt-4o", "gpt-4o-mini"
LONG_QUESTION = "Please tell me everything about my account history " * 30


def _routed_tenant(tenant_factory, routes, **options):
    setup = tenant_factory(**options)
    setup.assistant.model, setup.assistant.routes = STRONG, routes
    setup.assistant.save()
    return setup


def _chat_records(tenant) -> list[UsageRecord]:
    return list(UsageRecord.objects.filter(tenant=tenant, call_id__startswith="msg-").order_by("created_at"))


def _answers(tenant) -> list[Message]:
    return list(Message.objects.filter(tenant=tenant, role="assistant").order_by("created_at"))


def _list_saving(record: UsageRecord) -> Decimal:
    tokens = {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens}
    return price_for(STRONG).cost(**tokens) - price_for(record.model).cost(**tokens)


async def test_short_question_goes_to_the_cheap_model_and_a_long_one_to_the_strong(tenant_factory, chat, sim):
    routes = [{"name": "short", "model": CHEAP, "when": {"max_input_tokens": 100}}]
    setup = await adb(_routed_tenant)(tenant_factory, routes)
    async with chat(await adb(setup.token)()) as socket:
        short = await socket.turn("What are your opening hours?")
        long = await socket.turn(LONG_QUESTION)
    assert [e["model"] for e in (short + long) if e["type"] == "message.started"] == [CHEAP, STRONG]
    assert [r["model"] for r in list(sim.requests)] == [CHEAP, STRONG]  # what the provider was asked

    cheap, strong = await adb(_chat_records)(setup.tenant)
    assert (cheap.model, cheap.requested_model, cheap.route) == (CHEAP, STRONG, "short")
    assert cheap.saved_routing_usd == await adb(_list_saving)(cheap) > 0
    cheap_price = await adb(price_for)(CHEAP)
    assert cheap.cost_usd == cheap_price.cost(prompt_tokens=cheap.prompt_tokens, completion_tokens=cheap.completion_tokens)
    assert (strong.model, strong.requested_model, strong.route, strong.saved_routing_usd) == (STRONG, "", "", 0)
    answers = await adb(_answers)(setup.tenant)
    assert [(m.model, m.route) for m in answers] == [(CHEAP, "short"), (STRONG, "")]


async def test_a_pattern_route_matches_the_question(tenant_factory, chat, sim):
    routes = [{"name": "billing", "model": "gpt-3.5-turbo", "when": {"pattern": "(?i)\\b(refund|invoice)\\b"}}]
    setup = await adb(_routed_tenant)(tenant_factory, routes)
    async with chat(await adb(setup.token)()) as socket:
        await socket.turn("Where is my INVOICE for March?")
        await socket.turn("Tell me a story")
    records = await adb(_chat_records)(setup.tenant)
    assert [(r.model, r.route) for r in records] == [("gpt-3.5-turbo", "billing"), (STRONG, "")]


async def test_a_tools_condition_routes_only_turns_without_tools(tenant_factory, chat, sim):
    routes = [{"name": "no-tools", "model": CHEAP, "when": {"tools": False}}]
    with_tools = await adb(_routed_tenant)(tenant_factory, routes, tools=["calculator"])
    without = await adb(_routed_tenant)(tenant_factory, routes)
    for setup in (with_tools, without):
        async with chat(await adb(setup.token)()) as socket:
            await socket.turn("Hello")
    assert [r.model for r in await adb(_chat_records)(with_tools.tenant)] == [STRONG]
    assert [r.model for r in await adb(_chat_records)(without.tenant)] == [CHEAP]


async def test_depth_sends_a_conversation_past_its_first_turns_to_another_model(tenant_factory, chat, sim):
    routes = [{"name": "opening", "model": CHEAP, "when": {"max_depth": 2}}]
    setup = await adb(_routed_tenant)(tenant_factory, routes)
    async with chat(await adb(setup.token)()) as socket:
        first = await socket.turn("One")
        conversation_id = first[0]["id"]
        for content in ("Two", "Three"):
            await socket.turn(content, conversation_id=conversation_id)
    assert [r.model for r in await adb(_chat_records)(setup.tenant)] == [CHEAP, CHEAP, STRONG]


CLASSIFIED = [{"name": "graded", "model": CHEAP, "when": {"classifier": {"model": CHEAP, "label": "simple"}}}]


async def test_a_classifier_route_grades_the_question_and_bills_the_grading_call(tenant_factory, chat, sim):
    setup = await adb(_routed_tenant)(tenant_factory, CLASSIFIED)
    async with chat(await adb(setup.token)()) as socket:
        await socket.turn("What time do you open?")
        await socket.turn("Explain why my two invoices differ and compare them")
    sent = list(sim.requests)
    assert [r["model"] for r in sent] == [CHEAP, CHEAP, CHEAP, STRONG]  # grade, answer, grade, answer
    assert "simple or complex" in sent[0]["messages"][0]["content"]

    records = await adb(lambda: list(UsageRecord.objects.filter(tenant=setup.tenant).order_by("created_at")))()
    grades = [r for r in records if r.call_id.startswith("grade-")]
    assert len(grades) == 2 and all(r.kind == "chat" and r.route == "graded" and r.cost_usd > 0 for r in grades)
    assert all(r.model == CHEAP and r.completion_tokens >= 1 and not r.estimated for r in grades)
    chats = [r for r in records if r.call_id.startswith("msg-")]
    assert [(r.model, r.route) for r in chats] == [(CHEAP, "graded"), (STRONG, "")]


async def test_a_failed_grading_call_fails_open_to_the_default(tenant_factory, chat, sim):
    setup = await adb(_routed_tenant)(tenant_factory, CLASSIFIED)
    sim.inject(status=400)  # the grading call is refused
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("What time do you open?")
    assert events[-1]["type"] == "message.completed"
    records = await adb(lambda: list(UsageRecord.objects.filter(tenant=setup.tenant).order_by("created_at")))()
    assert [(r.call_id[:6], r.model, r.outcome, r.cost_usd) for r in records][0] == ("grade-", CHEAP, "error", 0)
    assert records[1].model == STRONG


async def test_a_route_to_an_unpriced_model_is_passed_over(tenant_factory, chat, sim):
    setup = await adb(_routed_tenant)(tenant_factory, [{"name": "nowhere", "model": "no-such-model"}])
    async with chat(await adb(setup.token)()) as socket:
        await socket.turn("Hello")
    assert [r.model for r in await adb(_chat_records)(setup.tenant)] == [STRONG]


# --- /v1 aliases ---------------------------------------------------------------------------


def _alias_tenant(tenant_factory) -> tuple:
    setup = tenant_factory()
    ModelAlias.objects.create(tenant=setup.tenant, name="auto", default_model=STRONG, routes=[
        {"name": "short", "model": CHEAP, "when": {"max_input_tokens": 60}},
    ])
    return setup


def _client(parley, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=parley.openai_base_url, api_key=api_key, max_retries=0)


def test_an_alias_on_v1_routes_and_the_reply_names_the_model_used(parley, tenant_factory, sim):
    setup = _alias_tenant(tenant_factory)
    client = _client(parley, setup.api_key)
    short = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Opening hours?"}])
    stream = client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": LONG_QUESTION}], stream=True,
    )
    streamed = [chunk.model for chunk in stream]
    assert short.model == CHEAP and set(streamed) == {STRONG}
    records = list(UsageRecord.objects.filter(tenant=setup.tenant).order_by("created_at"))
    assert [(r.model, r.requested_model, r.route) for r in records] == [(CHEAP, "auto", "short"), (STRONG, "auto", "")]
    assert records[0].saved_routing_usd == _list_saving(records[0]) > 0 and records[1].saved_routing_usd == 0


def test_v1_models_lists_the_tenants_aliases_and_no_one_elses(parley, tenant_factory, sim):
    setup, other = _alias_tenant(tenant_factory), tenant_factory()
    assert "auto" in [m.id for m in _client(parley, setup.api_key).models.list()]
    assert _client(parley, setup.api_key).models.retrieve("auto").id == "auto"
    assert "auto" not in [m.id for m in _client(parley, other.api_key).models.list()]
    with pytest.raises(openai.NotFoundError):  # another tenant's alias is not a model here
        _client(parley, other.api_key).chat.completions.create(model="auto", messages=[{"role": "user", "content": "x"}])


def test_an_alias_with_a_classifier_grades_on_v1(parley, tenant_factory, sim):
    setup = tenant_factory()
    ModelAlias.objects.create(tenant=setup.tenant, name="smart", default_model=STRONG, routes=CLASSIFIED)
    reply = _client(parley, setup.api_key).chat.completions.create(
        model="smart", messages=[{"role": "user", "content": "Is the shop open on Sunday?"}]
    )
    assert reply.model == CHEAP
    records = list(UsageRecord.objects.filter(tenant=setup.tenant).order_by("created_at"))
    assert [(r.call_id.split("-")[0], r.model, r.route) for r in records] == [("grade", CHEAP, "graded"),
                                                                              ("cmpl", CHEAP, "graded")]


def test_an_alias_request_the_cache_answers_is_not_graded(parley, tenant_factory, sim):
    """An opted-in key's repeated request to a classifier alias: the cache answers it, so no
    grading call is made (the first request was graded and answered)."""
    from tenants.models import ApiKey

    setup = tenant_factory()
    ApiKey.objects.filter(tenant=setup.tenant).update(response_cache=True)
    ModelAlias.objects.create(tenant=setup.tenant, name="smart", default_model=STRONG, routes=CLASSIFIED)
    client = _client(parley, setup.api_key)
    ask = {"model": "smart", "messages": [{"role": "user", "content": "Is the shop open on Sunday?"}], "temperature": 0}
    first = client.chat.completions.with_raw_response.create(**ask)
    again = client.chat.completions.with_raw_response.create(**ask)

    assert (first.headers["x-parley-cache"], again.headers["x-parley-cache"]) == ("miss", "hit")
    assert [r["model"] for r in sim.requests] == [CHEAP, CHEAP]  # one grade, one answer: nothing for the hit
    assert again.parse().choices[0].message.content == first.parse().choices[0].message.content
    records = list(UsageRecord.objects.filter(tenant=setup.tenant).order_by("created_at"))
    assert [(r.kind, r.call_id.split("-")[0]) for r in records] == [("chat", "grade"), ("completion", "cmpl"),
                                                                     ("cached", "cached")]
