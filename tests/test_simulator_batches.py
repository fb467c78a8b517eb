"""The simulator's Batch API, through the official SDK over real HTTP (no Parley in between)."""

from __future__ import annotations

import json

import openai
import pytest

from simulator import create_app
from tests.simserver import SimulatorServer


def _lines(*contents: str) -> bytes:
    return b"".join(json.dumps({"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-4o-mini", "max_tokens": 30, "messages": [{"role": "user", "content": text}]}}).encode() + b"\n"
        for n, text in enumerate(contents))


def _client(server: SimulatorServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0)


def test_a_batch_runs_on_the_first_retrieve_and_its_files_are_openai_shaped(sim, simulator_server):
    client = _client(simulator_server)
    uploaded = client.files.create(file=("in.jsonl", _lines("Hello", "Fail [[sim:status=500]]")), purpose="batch")
    assert (uploaded.object, uploaded.purpose, uploaded.bytes) == ("file", "batch", len(_lines("Hello", "Fail [[sim:status=500]]")))
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "validating"

    done = client.batches.retrieve(batch.id)

    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    [answer] = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert answer["custom_id"] == "r0" and answer["response"]["status_code"] == 200
    assert answer["response"]["body"]["choices"][0]["message"]["content"].startswith("You said: Hello.")
    assert answer["response"]["body"]["usage"]["completion_tokens"] <= 30
    [error] = [json.loads(line) for line in client.files.content(done.error_file_id).text.splitlines()]
    assert error["custom_id"] == "r1" and error["response"]["status_code"] == 500
    assert sim.batches.lines_run == 2 and sim.stats.requests == 0
    assert [b.id for b in client.batches.list().data] == [batch.id]


def test_a_held_batch_stays_in_progress_until_cancelled(sim, simulator_server):
    sim.batches.hold = True
    client = _client(simulator_server)
    uploaded = client.files.create(file=("in.jsonl", _lines("Hello")), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.retrieve(batch.id).status == "in_progress"

    assert client.batches.cancel(batch.id).status == "cancelling"
    assert client.batches.retrieve(batch.id).status == "cancelled"
    assert sim.batches.lines_run == 0
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")


def test_a_simulator_without_batches_answers_404_like_a_server_without_a_batch_api():
    with SimulatorServer(create_app(batches=False)) as server:
        with pytest.raises(openai.NotFoundError):
            _client(server).files.create(file=("in.jsonl", _lines("Hello")), purpose="batch")
        with pytest.raises(openai.NotFoundError):
            _client(server).batches.retrieve("batch_x")
