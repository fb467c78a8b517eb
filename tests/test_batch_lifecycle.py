"""A batch's life below the HTTP surface, the tasks driven directly: expiry, a local run resumed
after its worker stopped, results booked once, and the holds each step leaves."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from batches import execution, tasks
from batches.models import Batch, BatchLine
from batches.polling import results_apply
from batches.services import batch_create, file_create
from billing.caps import reservations_expire
from billing.metering import worst_case_cost
from billing.models import CapPeriod, Reservation, SpendingCap, UsageRecord
from billing.selectors import caps_reconcile
from billing.services import price_for
from llm.tokens import count_request_prompt
from tenants.models import ApiKey, ProviderCredential

# Not transactional: a submitted batch's on-commit start never fires, so each test drives the tasks.
pytestmark = pytest.mark.django_db

MODEL = "gpt-4o-mini"


def _line(custom_id: str, content: str, max_tokens: int = 40) -> bytes:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}}).encode() + b"\n"


def _batch(setup, *contents: str, cap: str | None = "5") -> Batch:
    if cap is not None:
        SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal(cap))
    upload = file_create(tenant_id=setup.tenant.pk, purpose="batch", filename="in.jsonl",
                         content=b"".join(_line(f"line-{n}", text) for n, text in enumerate(contents)))
    return batch_create(api_key=ApiKey.objects.get(tenant=setup.tenant), input_file_id=upload.public_id,
                        endpoint="/v1/chat/completions", completion_window="24h", metadata=None)


def test_the_whole_batch_is_held_at_the_batch_price_and_the_stale_sweep_leaves_it_alone(tenant_factory, sim):
    setup = tenant_factory()
    batch = _batch(setup, "One", "Two")

    price = price_for(MODEL)
    lines = list(BatchLine.objects.filter(batch=batch))
    expected = [worst_case_cost(price=price.batch(), prompt_tokens=count_request_prompt(line.body, MODEL),
                                max_tokens=40) for line in lines]
    assert batch.held_usd == sum(expected) > 0
    assert all(line.worst_case_usd > cost for line, cost in zip(lines, expected, strict=True))  # normal price
    held = Reservation.objects.get(pk=batch.reservation_id)
    assert held.amount_usd == batch.held_usd and CapPeriod.objects.get(tenant=setup.tenant).reserved_usd == batch.held_usd
    # A batch may run for 24 h: the sweep of holds left by crashed processes is not for it.
    Reservation.objects.filter(pk=held.pk).update(created_at=timezone.now() - timedelta(hours=2))
    assert reservations_expire(older_than=timedelta(minutes=30)) == 0
    assert Reservation.objects.get(pk=held.pk).status == "held"


def test_a_batch_past_its_window_expires_and_its_unrun_lines_cost_nothing(tenant_factory, sim):
    setup = tenant_factory()
    batch = _batch(setup, "One", "Two")
    Batch.objects.filter(pk=batch.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    tasks.batch_poll(str(batch.pk))

    batch.refresh_from_db()
    assert batch.status == "expired" and batch.expired_at is not None and batch.cost_usd == 0
    assert set(BatchLine.objects.filter(batch=batch).values_list("status", flat=True)) == {"cancelled"}
    errors = [json.loads(line) for line in bytes(batch.error_file.content).splitlines()]
    assert [e["error"]["code"] for e in errors] == ["batch_expired", "batch_expired"]
    assert not UsageRecord.objects.filter(tenant=setup.tenant).exists() and sim.batches.lines_run == 0
    assert Reservation.objects.get(pk=batch.reservation_id).status == "settled"
    assert CapPeriod.objects.get(tenant=setup.tenant).reserved_usd == 0
    assert not caps_reconcile(tenant_id=setup.tenant.pk).drift


def test_a_local_run_resumes_where_it_stopped_and_books_each_line_once(tenant_factory, plain_server, settings):
    settings.BATCH_LOCAL_CONCURRENCY = 1
    settings.BATCH_RUN_SECONDS = 0  # one round per run: a worker that stops after each line
    setup = tenant_factory()
    ProviderCredential.objects.filter(tenant=setup.tenant).update(base_url=plain_server.base_url)
    batch = _batch(setup, "One", "Two", "Three")
    assert execution.batch_begin(batch) == "local"
    batch.refresh_from_db()

    assert execution.batch_run_local(batch) is False
    first = BatchLine.objects.get(batch=batch, index=0)
    assert first.status == "completed" and UsageRecord.objects.filter(tenant=setup.tenant).count() == 1
    # A second delivery of the same answer (a worker that died before it knew) books nothing.
    answer = execution.LineAnswer(status_code=200, body=first.response["body"])
    execution.line_answered(batch, first, answer, batch_priced=False, prices={})
    assert UsageRecord.objects.filter(tenant=setup.tenant).count() == 1

    while not execution.batch_run_local(batch):
        pass
    batch.refresh_from_db()
    assert batch.status == "completed" and (batch.completed, batch.failed) == (3, 0)
    assert plain_server.app.stats.requests == 3
    records = UsageRecord.objects.filter(tenant=setup.tenant)
    assert records.count() == 3 and batch.cost_usd == sum(r.cost_usd for r in records)
    assert not caps_reconcile(tenant_id=setup.tenant.pk).drift


def test_a_provider_result_file_applied_twice_books_each_line_once(tenant_factory, sim):
    setup = tenant_factory()
    batch = _batch(setup, "One", "Two")
    body = {"choices": [{"message": {"role": "assistant", "content": "ok"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2}}
    content = b"".join(json.dumps({"custom_id": f"line-{n}", "response": {"status_code": 200, "body": body},
                                   "error": None}).encode() + b"\n" for n in range(2))

    assert results_apply(batch, content, prices={}) == 2
    assert results_apply(batch, content, prices={}) == 0
    records = list(UsageRecord.objects.filter(tenant=setup.tenant))
    price = price_for(MODEL)
    assert len(records) == 2 and all(r.cost_usd == price.batch().cost(prompt_tokens=10, completion_tokens=2)
                                     for r in records)
    # Booked lines moved their cost from the hold to the spend as they came.
    period = CapPeriod.objects.get(tenant=setup.tenant)
    assert period.spent_usd == sum(r.cost_usd for r in records)
    assert period.reserved_usd == batch.held_usd - period.spent_usd
    assert not caps_reconcile(tenant_id=setup.tenant.pk).drift


def test_a_batch_over_the_line_limit_is_refused(tenant_factory, sim, settings):
    from batches.validation import InvalidBatch

    settings.BATCH_MAX_LINES = 2
    setup = tenant_factory()
    with pytest.raises(InvalidBatch, match="at most 2"):
        _batch(setup, "One", "Two", "Three", cap=None)
    assert not Batch.objects.exists()
