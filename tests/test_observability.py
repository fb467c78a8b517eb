"""Operations (issue 16): `/metrics` tells what every surface did, with the ledger's own token
and USD figures; every log line of a turn carries its request id; the id comes back in the
`X-Request-ID` header and in error bodies."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from decimal import Decimal

import httpx2
import openai
import pytest
import websockets
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from billing.models import SpendingCap, UsageRecord
from observability import celery_signals, context, metrics
from observability.logs import logging_config
from tests.conftest import adb

MODEL = "gpt-4o-mini"

pytestmark = pytest.mark.django_db(transaction=True)


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def _total(samples, name: str, **labels: str) -> float:
    return sum(value for n, found, value in samples if n == name and all(found.get(k) == v for k, v in labels.items()))


async def _scrape(parley) -> list[tuple[str, dict[str, str], float]]:
    async with httpx2.AsyncClient() as client:
        response = await client.get(f"{parley.url}/metrics")
    assert response.status_code == 200, response.text
    return _samples(response.text)


async def _socket_turn(parley, token: str, content: str) -> list[dict]:
    events = []
    async with websockets.connect(f"ws://{parley.url[7:]}/ws/chat/?token={token}") as ws:
        await ws.send(json.dumps({"type": "message.create", "conversation_id": None, "content": content}))
        while not events or events[-1]["type"] not in ("message.completed", "error"):
            events.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
    return events


async def test_metrics_after_a_socket_turn_and_v1_calls_match_the_ledger(parley, tenant_factory, sim, settings):
    setup = await adb(tenant_factory)()
    capped = await adb(tenant_factory)()
    await SpendingCap.objects.acreate(tenant=capped.tenant, scope="tenant", period="month", limit_usd=Decimal("0.0000001"))
    before = await _scrape(parley)

    events = await _socket_turn(parley, await adb(setup.token)(), "Hello, how are you?")
    assert events[-1]["type"] == "message.completed"
    client = openai.AsyncOpenAI(base_url=parley.openai_base_url, api_key=setup.api_key, max_retries=0)
    reply = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi there"}])
    with pytest.raises(openai.InternalServerError):  # 500 every attempt: retried, then a 502
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x [[sim:status=500]]"}])
    refused = openai.AsyncOpenAI(base_url=parley.openai_base_url, api_key=capped.api_key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        await refused.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    await adb(parley.settle)()

    records = [r async for r in UsageRecord.objects.filter(tenant=setup.tenant)]
    assert len(records) == 3 and reply.usage.completion_tokens > 0  # the turn, the call, the refused call at $0
    after = await _scrape(parley)

    def delta(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    model = MODEL
    assert delta("parley_tokens_total", model=model, type="prompt") == sum(r.prompt_tokens for r in records)
    assert delta("parley_tokens_total", model=model, type="completion") == sum(r.completion_tokens for r in records)
    assert delta("parley_cost_usd_total", model=model) == pytest.approx(float(sum(r.cost_usd for r in records)), abs=1e-9)
    assert delta("parley_upstream_calls_total", model=model, kind="chat") == 1  # the turn
    assert delta("parley_upstream_calls_total", model=model, kind="completion") == 2  # /v1
    assert delta("parley_time_to_first_token_seconds_count", model=model) == sum(r.ttft_ms is not None for r in records) >= 2
    assert delta("parley_upstream_call_seconds_count", model=model) >= 2
    assert delta("parley_generation_seconds_count", surface="chat") == 1
    assert delta("parley_generation_seconds_count", surface="v1") >= 2
    assert delta("parley_requests_total", surface="ws", code="101") == 1
    assert delta("parley_requests_total", surface="v1", code="200") == 1
    assert delta("parley_requests_total", surface="v1", code="502") == 1
    assert delta("parley_errors_total", surface="v1", code="upstream_error") == 1
    assert delta("parley_errors_total", surface="v1", code="spending_cap_exceeded") == 1
    assert delta("parley_refusals_total", reason="spending_cap", tenant="other") == 1
    host = "127.0.0.1"
    assert delta("parley_upstream_errors_total", host=host, kind="500") == 3  # the first try and 2 retries
    assert delta("parley_upstream_retries_total", host=host) == 2
    names = {name for name, _, _ in after}
    assert {"parley_sockets_open", "parley_generations_active", "parley_event_log_lag_entries"} <= names
    if settings.REDIS_URL:  # services mode: Celery's queue read at scrape time
        assert _total(after, "parley_celery_queue_length", queue="celery") >= 0 and "parley_celery_queue_length" in names
    assert _total(after, "parley_sockets_open") == 0 and _total(after, "parley_generations_active") == 0


def test_metrics_auth_token_or_loopback_without_proxy(settings):
    settings.METRICS_TOKEN = ""
    assert Client().get("/metrics").status_code == 200
    assert Client().get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"}).status_code == 404
    assert Client(REMOTE_ADDR="10.1.2.3").get("/metrics").status_code == 404
    settings.METRICS_TOKEN = "scrape-secret-123"
    assert Client().get("/metrics").status_code == 401
    assert Client().get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = Client(REMOTE_ADDR="10.1.2.3").get("/metrics", headers={"Authorization": "Bearer scrape-secret-123"})
    assert ok.status_code == 200 and ok["Content-Type"].startswith("text/plain")


def test_cache_hits_and_tenant_labels(settings, tenant_factory):
    metrics.cache_hit("exact")
    text = Client().get("/metrics").content.decode()
    assert _total(_samples(text), "parley_response_cache_hits_total", kind="exact") >= 1
    setup = tenant_factory()
    settings.METRICS_TENANT_LABELS = [setup.tenant.slug]
    metrics.tenant_labels_forget()
    assert metrics.tenant_label(setup.tenant.id) == setup.tenant.slug
    assert metrics.tenant_label(setup.tenant.id + 1000) == "other"
    settings.METRICS_TENANT_LABELS = []
    metrics.tenant_labels_forget()
    assert metrics.tenant_label(setup.tenant.id) == "other"


def _json_capture() -> tuple[logging.Handler, io.StringIO]:
    """A handler exactly like the services-mode console's (JSON formatter, context filter)."""
    stream = io.StringIO()
    config = logging_config(json_lines=True, level="DEBUG")
    handler = logging.StreamHandler(stream)
    from pythonjsonlogger.json import JsonFormatter

    json_options = {k: v for k, v in config["formatters"]["json"].items() if k != "()"}
    handler.setFormatter(JsonFormatter(**json_options))
    handler.addFilter(context.ContextFilter())
    return handler, stream


async def test_the_log_lines_of_one_turn_share_its_request_id(tenant_factory, chat, sim):
    handler, stream = _json_capture()
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        setup = await adb(tenant_factory)()
        headers = [(b"origin", b"http://127.0.0.1"), (b"host", b"127.0.0.1"), (b"x-request-id", b"sock-42")]
        async with chat(await adb(setup.token)(), headers=headers) as socket:
            events = await socket.turn("Hello there")
            failed = await socket.turn("Again [[sim:status=400]]", conversation_id=events[0]["id"])
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    first_message = next(e["message_id"] for e in events if e["type"] == "message.started")
    of_turn = [line for line in lines if line.get("message_id") == first_message]
    assert of_turn and {line["request_id"] for line in of_turn} == {"sock-42.1"}
    assert all(line["tenant_id"] == setup.tenant.id and line["conversation_id"] == events[0]["id"] for line in of_turn)
    assert any("usage booked" in line["message"] for line in of_turn)  # from the generation's database thread
    assert failed[-1]["type"] == "error" and failed[-1]["request_id"] == "sock-42.2"
    assert {line["request_id"] for line in lines if "usage booked" in line["message"]} == {"sock-42.1", "sock-42.2"}
    access = [line for line in lines if line["logger"] == "parley.access"]
    assert access and access[-1]["request_id"] == "sock-42" and "?token" not in access[-1]["message"]


async def test_request_id_header_and_error_bodies(parley, tenant_factory):
    async with httpx2.AsyncClient() as client:
        given = await client.get(f"{parley.url}/api/v1/conversations/", headers={"X-Request-ID": "ops-123_a.b"})
        made = await client.get(f"{parley.url}/api/v1/conversations/", headers={"X-Request-ID": "no spaces allowed"})
        v1 = await client.get(f"{parley.openai_base_url}/models", headers={"Authorization": "Bearer pk_nope"})
        ok = await client.get(f"{parley.url}/healthz")
    assert given.status_code == 401 and given.headers["x-request-id"] == "ops-123_a.b"
    assert given.json()["error"]["request_id"] == "ops-123_a.b"
    assert made.headers["x-request-id"] != "no spaces allowed" and len(made.headers["x-request-id"]) == 32
    assert made.json()["error"]["request_id"] == made.headers["x-request-id"]
    assert v1.status_code == 401 and v1.json()["error"]["request_id"] == v1.headers["x-request-id"]
    assert ok.headers["x-request-id"] and ok.headers["x-request-id"] != made.headers["x-request-id"]


def test_celery_carries_the_request_id_and_counts_outcomes():
    token = context.context_start("req-celery-1")
    try:
        headers: dict = {}
        celery_signals._publish(headers=headers)
        assert headers == {"parley_request_id": "req-celery-1"}
    finally:
        context.context_end(token)

    class Request:
        parley_request_id = "req-celery-1"

    class Task:
        name = "billing.tasks.cap_alerts_notify"
        request = Request()

    before = _total(_samples(Client().get("/metrics").content.decode()), "parley_celery_tasks_total",
                    task=Task.name, outcome="success")
    celery_signals._prerun(task=Task)
    assert context.request_id_current() == "req-celery-1"
    celery_signals._postrun(task=Task, state="SUCCESS")
    assert context.request_id_current() is None
    after = _total(_samples(Client().get("/metrics").content.decode()), "parley_celery_tasks_total",
                   task=Task.name, outcome="success")
    assert after == before + 1
