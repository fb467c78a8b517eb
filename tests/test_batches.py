"""The Batch API (`/v1/files`, `/v1/batches`), driven by the official SDK against a live Parley,
with the simulator as the provider over real HTTP: once with its Batch API, once without."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import openai
import pytest

from batches import tasks
from batches.models import Batch, BatchLine
from billing.models import CapPeriod, Reservation, SpendingCap, UsageRecord
from billing.selectors import caps_reconcile
from billing.services import price_for
from tests.simserver import SimulatorServer

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gpt-4o-mini"


@pytest.fixture
def plain_sim(plain_server):
    plain_server.app.reset()
    yield plain_server
    plain_server.app.reset()


def _client(parley, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=parley.openai_base_url, api_key=api_key, max_retries=0)


def _jsonl(*lines: dict) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _line(custom_id: str, content: str, max_tokens: int = 50) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]}}


def _submit(client: openai.OpenAI, content: bytes):
    uploaded = client.files.create(file=("lines.jsonl", content), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"job": "nightly"})


def _until_ended(client: openai.OpenAI, batch_id: str, rounds: int = 6):
    """Retrieve until the batch ends. The tests drive the tasks themselves (a worker in services
    mode; in embedded mode Celery is eager and they already ran, so these are no-ops)."""
    pk = str(uuid.UUID(batch_id.removeprefix("batch_")))
    tasks.batch_start(pk)
    for _ in range(rounds):
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        tasks.batch_poll(pk)
    return client.batches.retrieve(batch_id)


def _output(client: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_sdk_round_trip_on_a_provider_batch_api_books_each_line_at_the_batch_price(parley, tenant_factory, sim):
    setup = tenant_factory()
    SpendingCap.objects.create(tenant=setup.tenant, scope="api_key", period="month", limit_usd=Decimal("5"))
    client = _client(parley, setup.api_key)
    batch = _submit(client, _jsonl(_line("a", "First question"), _line("b", "Second question"),
                                   _line("c", "Third question")))
    assert batch.object == "batch" and batch.endpoint == "/v1/chat/completions" and batch.metadata == {"job": "nightly"}

    done = _until_ended(client, batch.id)

    assert done.status == "completed" and done.request_counts.total == 3 and done.request_counts.completed == 3
    assert done.error_file_id is None
    output = {entry["custom_id"]: entry for entry in _output(client, done.output_file_id)}
    assert set(output) == {"a", "b", "c"}
    assert output["b"]["response"]["status_code"] == 200
    assert output["b"]["response"]["body"]["choices"][0]["message"]["content"].startswith("You said: Second question.")
    # The provider ran the lines as a batch: no chat completion reached it.
    assert sim.batches.lines_run == 3 and sim.stats.requests == 0
    records = list(UsageRecord.objects.filter(tenant=setup.tenant))
    assert len(records) == 3 and {r.kind for r in records} == {"batch"}
    price = price_for(MODEL)
    for record in records:
        usage = output[_custom_id(record)]["response"]["body"]["usage"]
        assert (record.prompt_tokens, record.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
        tokens = {"prompt_tokens": record.prompt_tokens, "completion_tokens": record.completion_tokens}
        assert record.cost_usd == price.batch().cost(**tokens) > 0
        assert record.saved_batch_usd == price.cost(**tokens) - record.cost_usd > 0
    stored = Batch.objects.get(tenant=setup.tenant)
    assert stored.mode == "provider" and stored.cost_usd == sum(r.cost_usd for r in records)
    assert done.model_extra["parley"]["mode"] == "provider"
    # The hold is settled: what was spent is on the cap, nothing is held, the ledger agrees.
    assert Reservation.objects.get(tenant=setup.tenant).status == "settled"
    period = CapPeriod.objects.get(tenant=setup.tenant)
    assert (period.reserved_usd, period.spent_usd) == (0, stored.cost_usd)
    assert not caps_reconcile(tenant_id=setup.tenant.pk).drift


def _custom_id(record: UsageRecord) -> str:
    index = int(record.call_id.rsplit(":", 1)[1])
    return BatchLine.objects.get(batch__tenant_id=record.tenant_id, index=index).custom_id


def test_sdk_round_trip_without_a_provider_batch_api_runs_the_lines_at_the_normal_price(
    parley, tenant_factory, plain_sim
):
    setup = _tenant_on(tenant_factory, plain_sim)
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("5"))
    client = _client(parley, setup.api_key)
    batch = _submit(client, _jsonl(_line("x", "Classify this"), _line("y", "And this [[sim:status=400]]"),
                                   _line("z", "And that")))

    done = _until_ended(client, batch.id)

    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert {e["custom_id"] for e in _output(client, done.output_file_id)} == {"x", "z"}
    [failed] = _output(client, done.error_file_id)
    assert failed["custom_id"] == "y" and failed["response"]["status_code"] == 400
    # Parley ran each line as a chat completion, with its max_tokens.
    assert plain_sim.app.stats.requests == 3
    assert all(request["max_tokens"] == 50 for request in plain_sim.app.requests)
    records = list(UsageRecord.objects.filter(tenant=setup.tenant))
    assert len(records) == 2 and {r.kind for r in records} == {"batch"}  # the failed line costs nothing
    price = price_for(MODEL)
    for record in records:
        assert record.cost_usd == price.cost(prompt_tokens=record.prompt_tokens,
                                             completion_tokens=record.completion_tokens) > 0
        assert record.saved_batch_usd == 0
    assert Batch.objects.get(tenant=setup.tenant).mode == "local"
    period = CapPeriod.objects.get(tenant=setup.tenant)
    assert period.reserved_usd == 0 and period.spent_usd == sum(r.cost_usd for r in records)
    assert not caps_reconcile(tenant_id=setup.tenant.pk).drift


def _tenant_on(tenant_factory, server: SimulatorServer):
    from tenants.models import ProviderCredential

    setup = tenant_factory()
    ProviderCredential.objects.filter(tenant=setup.tenant).update(base_url=server.base_url)
    return setup


def test_a_batch_that_does_not_fit_the_cap_is_refused_at_submit(parley, tenant_factory, sim):
    setup = tenant_factory()
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("0.0005"))
    client = _client(parley, setup.api_key)
    # 2 x 1,000 output tokens at the batch price ($0.60 / 1M) is $0.0012: over the cap.
    content = _jsonl(_line("a", "One", max_tokens=1000), _line("b", "Two", max_tokens=1000))
    with pytest.raises(openai.RateLimitError) as refused:
        _submit(client, content)

    assert refused.value.code == "spending_cap_exceeded"
    assert not Batch.objects.filter(tenant=setup.tenant).exists()
    assert not Reservation.objects.filter(tenant=setup.tenant).exists()
    assert all(period.reserved_usd == 0 for period in CapPeriod.objects.filter(tenant=setup.tenant))
    assert sim.batches.lines_run == 0 and not sim.batches.batches


def test_cancel_stops_a_provider_batch_and_the_lines_cost_nothing(parley, tenant_factory, sim):
    setup = tenant_factory()
    SpendingCap.objects.create(tenant=setup.tenant, scope="tenant", period="month", limit_usd=Decimal("5"))
    sim.batches.hold = True  # the provider keeps it in progress
    client = _client(parley, setup.api_key)
    batch = _submit(client, _jsonl(_line("a", "One"), _line("b", "Two")))
    pk = str(uuid.UUID(batch.id.removeprefix("batch_")))
    tasks.batch_start(pk)
    assert client.batches.retrieve(batch.id).status == "in_progress"

    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = _until_ended(client, batch.id)

    assert done.status == "cancelled" and done.cancelled_at is not None and done.output_file_id is None
    assert {e["error"]["code"] for e in _output(client, done.error_file_id)} == {"batch_cancelled"}
    assert [b["status"] for b in sim.batches.batches.values()] == ["cancelled"]
    assert not UsageRecord.objects.filter(tenant=setup.tenant).exists()
    assert CapPeriod.objects.get(tenant=setup.tenant).reserved_usd == 0
    assert Batch.objects.get(tenant=setup.tenant).cost_usd == 0


def test_a_malformed_line_is_a_400_naming_it_and_nothing_is_held(parley, tenant_factory, sim):
    setup = tenant_factory()
    client = _client(parley, setup.api_key)
    bad_url = {**_line("c", "Three"), "url": "/v1/embeddings"}
    unpriced = _line("d", "Four")
    unpriced["body"]["model"] = "no-such-model"
    content = _jsonl(_line("a", "One")) + b"{not json\n" + _jsonl(bad_url, unpriced)
    with pytest.raises(openai.BadRequestError) as refused:
        _submit(client, content)

    message = refused.value.message
    assert "line 2: not valid JSON" in message and "line 3: 'url'" in message and "line 4" in message
    assert "no-such-model" in message and refused.value.code == "invalid_file"
    assert not Batch.objects.exists() and not Reservation.objects.filter(tenant=setup.tenant).exists()


def test_another_tenants_batch_and_file_answer_like_missing_ones(parley, tenant_factory, sim):
    owner, other = tenant_factory(), tenant_factory()
    batch = _submit(_client(parley, owner.api_key), _jsonl(_line("a", "One")))
    intruder = _client(parley, other.api_key)

    for attempt in (lambda: intruder.batches.retrieve(batch.id), lambda: intruder.batches.cancel(batch.id),
                    lambda: intruder.files.retrieve(batch.input_file_id),
                    lambda: intruder.files.content(batch.input_file_id),
                    lambda: intruder.batches.retrieve("batch_nonsense")):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert intruder.batches.list().data == []
    with pytest.raises(openai.AuthenticationError):
        _client(parley, "pk_bad_key").batches.list()


def test_batches_list_pages_newest_first_with_after_and_limit(parley, tenant_factory, sim):
    setup = tenant_factory()
    client = _client(parley, setup.api_key)
    ids = [_submit(client, _jsonl(_line("a", f"Job {n}"))).id for n in range(3)]

    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    rest = client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == [ids[0]] and not rest.has_more
    assert [b.id for b in client.batches.list(limit=1)] == ids[::-1]  # the SDK follows the cursor


def test_rest_api_lists_batches_with_counts_and_cost(parley, tenant_factory, sim, client):
    setup, other = tenant_factory(), tenant_factory()
    batch = _until_ended(_client(parley, setup.api_key),
                         _submit(_client(parley, setup.api_key), _jsonl(_line("a", "One"))).id)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {setup.api_key}"}

    listed = client.get("/api/v1/batches/", **auth).json()["results"]
    assert [(b["id"], b["status"], b["counts"]) for b in listed] == [(batch.id, "completed",
                                                                      {"total": 1, "completed": 1, "failed": 0})]
    assert Decimal(listed[0]["cost_usd"]) == UsageRecord.objects.get(tenant=setup.tenant).cost_usd > 0
    assert client.get(f"/api/v1/batches/{batch.id}/", **auth).json()["mode"] == "provider"
    foreign = client.get(f"/api/v1/batches/{batch.id}/", HTTP_AUTHORIZATION=f"Bearer {other.api_key}")
    assert foreign.status_code == 404 and foreign.json()["error"]["code"] == "not_found"
