"""The upstream simulator, driven by the real openai SDK over real HTTP (and once in-process)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from llm.tokens import count_messages, count_text
from simulator import Simulator, create_app
from tests.simserver import SimulatorServer

# `simulator_server` (one SimulatorServer for the session) and `sim` (its app, reset for each
# test) come from conftest.

MODEL = "gpt-4o"
HELLO = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Hello simulator, please tell me about rivers and lakes"}]


def sdk_options(server: SimulatorServer, **overrides: Any) -> dict[str, Any]:
    return {"base_url": server.base_url, "api_key": "sk-test", "max_retries": 0, "timeout": 5,
            **overrides}


@pytest.fixture
def client(simulator_server: SimulatorServer, sim: Simulator) -> openai.OpenAI:
    return openai.OpenAI(**sdk_options(simulator_server))


@pytest.fixture
def aclient(simulator_server: SimulatorServer, sim: Simulator) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(**sdk_options(simulator_server))


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def answer_text(client: openai.OpenAI, messages: list[dict[str, Any]]) -> str:
    return client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content


async def collect(stream: Any) -> tuple[list[str], list[Any]]:
    """The content deltas and all chunks of an SDK stream."""
    deltas, chunks = [], []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            deltas.append(chunk.choices[0].delta.content)
    return deltas, chunks


def test_answer_is_a_chat_completion_with_tiktoken_usage(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model=MODEL, messages=HELLO)

    text = answer.choices[0].message.content
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"
    assert answer.choices[0].finish_reason == "stop"
    # The echo stops after eight words.
    assert text.startswith("You said: Hello simulator, please tell me about rivers and. (turn 1)")
    assert len(text.split()) == 20
    assert answer.usage.prompt_tokens == count_messages(HELLO, MODEL)
    assert answer.usage.completion_tokens == count_text(text, MODEL)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    assert answer.usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.asyncio
async def test_stream_deltas_concatenate_to_the_answer(aclient: openai.AsyncOpenAI) -> None:
    whole = await aclient.chat.completions.create(model=MODEL, messages=HELLO)
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True})
    deltas, chunks = await collect(stream)

    assert "".join(deltas) == whole.choices[0].message.content
    assert len(deltas) == 20
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.object == "chat.completion.chunk" and c.usage is None for c in chunks[:-1])


def test_stream_wire_framing_matches_openai(
    simulator_server: SimulatorServer, sim: Simulator,
) -> None:
    def events(**extra: Any) -> list[dict[str, Any]]:
        body = {"model": MODEL, "messages": user("hi [[sim:words=3]]"), "stream": True, **extra}
        response = httpx2.post(f"{simulator_server.base_url}/chat/completions", json=body,
                               headers={"Authorization": "Bearer sk-test"})
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.content.endswith(b"}\n\ndata: [DONE]\n\n")
        frames = response.content.split(b"\n\n")[:-2]
        assert all(frame.startswith(b"data: {") for frame in frames)
        return [json.loads(frame.removeprefix(b"data: ")) for frame in frames]

    plain = events()
    assert all("usage" not in chunk for chunk in plain)
    assert [c["choices"][0]["delta"] for c in plain] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "You"}, {"content": " said:"}, {"content": " hi."}, {}]
    with_usage = events(stream_options={"include_usage": True})
    assert [c["usage"] for c in with_usage[:-1]] == [None] * 5
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["completion_tokens"] > 0


def test_max_tokens_stops_at_a_word_boundary_with_length(client: openai.OpenAI) -> None:
    words = answer_text(client, HELLO).split(" ")
    cut = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=7)

    text = cut.choices[0].message.content
    fits = max(n for n in range(len(words)) if count_text(" ".join(words[:n]), MODEL) <= 7)
    assert cut.choices[0].finish_reason == "length"
    assert text == " ".join(words[:fits])
    assert cut.usage.completion_tokens == count_text(text, MODEL) <= 7


@pytest.mark.asyncio
async def test_max_completion_tokens_ends_a_stream_with_length(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=HELLO, stream=True, max_completion_tokens=3)
    deltas, chunks = await collect(stream)

    assert deltas == ["You", " said:"]  # "You said: Hello" would be 4 tokens
    assert chunks[-1].choices[0].finish_reason == "length"


def test_words_directive_gives_exactly_n_words_and_is_stripped(client: openai.OpenAI) -> None:
    text = answer_text(client, user("Count with me [[sim:words=40]] please"))

    assert len(text.split()) == 40
    assert text.startswith("You said: Count with me please. (turn 1)")


def test_second_turn_sees_the_first_and_is_recorded(client: openai.OpenAI, sim: Simulator) -> None:
    first = answer_text(client, user("My name is Ada"))
    history = [*user("My name is Ada"), {"role": "assistant", "content": first},
               *user("What is my name?")]
    second = answer_text(client, history)

    assert second.startswith("You said: What is my name. (turn 2)")
    assert sim.requests[-1]["messages"] == history


def test_missing_bearer_is_an_authentication_error(simulator_server: SimulatorServer) -> None:
    basic = {"Authorization": "Basic c2stdGVzdA=="}
    client = openai.OpenAI(**sdk_options(simulator_server, default_headers=basic))
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=MODEL, messages=HELLO)
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_invalid_bodies_are_bad_requests(client: openai.OpenAI, sim: Simulator) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[])
    assert caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"content": "hi"}])  # type: ignore
    assert caught.value.param == "messages[0].role"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=user("[[sim:explode=1]]"))
    assert sim.stats.errors == 3 and sim.stats.prompt_tokens == 0


def test_429_carries_retry_after_and_ratelimit_headers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        answer_text(client, user("hi [[sim:status=429 retry_after=7]]"))

    error = caught.value
    assert error.code == "rate_limit_exceeded" and error.type == "rate_limit_error"
    assert error.response.headers["retry-after"] == "7"
    assert error.response.headers["x-ratelimit-limit-requests"]


def test_500_is_an_internal_server_error(client: openai.OpenAI, sim: Simulator) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        answer_text(client, user("hi [[sim:status=500]]"))
    assert caught.value.type == "server_error"
    assert (sim.stats.errors, sim.stats.completions, sim.stats.prompt_tokens) == (1, 0, 0)


def test_fail_times_then_the_sdk_retry_succeeds(
    simulator_server: SimulatorServer, sim: Simulator,
) -> None:
    client = openai.OpenAI(**sdk_options(simulator_server, max_retries=1))

    text = answer_text(client, user("retry me [[sim:status=503 fail_times=1 retry_after=0.01]]"))

    assert text.startswith("You said: retry me.")
    assert len(sim.requests) == 2
    assert (sim.stats.errors, sim.stats.completions) == (1, 1)


def test_ratelimit_headers_on_every_completion(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)
    again = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO)

    for name in ("x-request-id", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                 "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens",
                 "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        assert raw.headers[name]
    assert raw.headers["x-request-id"] != again.headers["x-request-id"]
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in (raw, again)]
    assert remaining[1] <= remaining[0] < int(raw.headers["x-ratelimit-limit-requests"])
    assert raw.parse().choices[0].message.content


@pytest.mark.asyncio
async def test_hang_ends_in_a_client_timeout(
    simulator_server: SimulatorServer, sim: Simulator,
) -> None:
    client = openai.AsyncOpenAI(**sdk_options(simulator_server, timeout=0.3))
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(
            model=MODEL, messages=user("wait [[sim:hang=1]]"), stream=True)

    assert time.monotonic() - started < 2
    assert sim.stats.incomplete == 1 and sim.stats.completion_tokens == 0
    assert sim.stats.prompt_tokens == count_messages(user("wait [[sim:hang=1]]"), MODEL)


@pytest.mark.asyncio
async def test_cut_gives_three_deltas_then_a_connection_error(
    aclient: openai.AsyncOpenAI, sim: Simulator,
) -> None:
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=user("Tell me a story [[sim:cut=3]]"), stream=True,
        stream_options={"include_usage": True})
    deltas: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            assert chunk.choices and chunk.choices[0].finish_reason is None
            if chunk.choices[0].delta.content:
                deltas.append(chunk.choices[0].delta.content)

    assert deltas == ["You", " said:", " Tell"]
    assert sim.stats.incomplete == 1 and sim.stats.completions == 0
    assert sim.stats.completion_tokens == count_text("".join(deltas), MODEL)


def test_cut_of_a_non_streamed_answer_is_a_connection_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        answer_text(client, user("hi [[sim:cut=1]]"))


@pytest.mark.asyncio
async def test_malformed_event_raises_while_iterating(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model=MODEL, messages=user("hi [[sim:malformed=2]]"), stream=True)
    deltas: list[str] = []
    with pytest.raises(json.JSONDecodeError):
        async for chunk in stream:
            deltas.append(chunk.choices[0].delta.content or "")
    assert "".join(deltas) == "You said:"


@pytest.mark.asyncio
async def test_stats_reconcile_with_what_was_served(
    aclient: openai.AsyncOpenAI, simulator_server: SimulatorServer,
) -> None:
    partial = user("partial [[sim:cut=5]]")
    whole = await aclient.chat.completions.create(model=MODEL, messages=HELLO)
    stream = await aclient.chat.completions.create(model=MODEL, messages=partial, stream=True)
    sent: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            sent.append(chunk.choices[0].delta.content or "")

    expected = {
        "requests": 2, "completions": 1, "incomplete": 1, "errors": 0,
        "prompt_tokens": whole.usage.prompt_tokens + count_messages(partial, MODEL),
        "completion_tokens": whole.usage.completion_tokens + count_text("".join(sent), MODEL),
        "cached_tokens": 0, "tool_calls": 0, "moderations": 0, "embeddings": 0, "rate_limited": 0,
    }
    async with httpx2.AsyncClient(base_url=simulator_server.url) as http:
        assert (await http.get("/sim/stats")).json() == expected
        assert len((await http.get("/sim/requests")).json()) == 2
        assert (await http.post("/sim/reset")).json()["requests"] == 0


@pytest.mark.asyncio
async def test_client_disconnect_stops_the_stream(
    simulator_server: SimulatorServer, sim: Simulator,
) -> None:
    client = openai.AsyncOpenAI(**sdk_options(simulator_server))
    messages = user("slow one [[sim:tps=20 words=100]]")
    stream = await client.chat.completions.create(model=MODEL, messages=messages, stream=True)
    received: list[str] = []
    async for chunk in stream:
        received.append(chunk.choices[0].delta.content or "")
        if len(received) == 4:
            break
    await stream.close()

    for _ in range(100):
        if sim.stats.incomplete:
            break
        await asyncio.sleep(0.01)
    assert sim.stats.incomplete == 1 and sim.stats.completions == 0
    served = sim.stats.completion_tokens
    full = await client.chat.completions.create(
        model=MODEL, messages=user("slow one [[sim:tps=0 words=100]]"))
    # What the client read was billed; the rest of the 100 words was never generated.
    assert count_text("".join(received), MODEL) <= served < full.usage.completion_tokens


@pytest.mark.asyncio
async def test_ttft_and_pacing_are_honoured(
    simulator_server: SimulatorServer, sim: Simulator,
) -> None:
    client = openai.AsyncOpenAI(**sdk_options(simulator_server))
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model=MODEL, messages=user("pace [[sim:ttft_ms=150 tps=50 words=6]]"), stream=True)
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)

    # Lower bounds only: the server cannot send early, but a busy machine may deliver late.
    assert len(arrivals) == 6
    assert arrivals[0] >= 0.15
    assert arrivals[-1] >= 0.15 + 5 / 50
    assert arrivals[-1] < 3


def test_injected_faults_are_consumed_in_order(client: openai.OpenAI, sim: Simulator) -> None:
    sim.inject(status=503, times=2)
    sim.inject(words=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            answer_text(client, HELLO)
    assert answer_text(client, HELLO) == "You said:"
    assert len(answer_text(client, HELLO).split()) == 20

    sim.inject(status=500)
    sim.reset()
    assert answer_text(client, HELLO)
    assert sim.stats.requests == 1 and not sim.faults


def test_models_are_listed(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert {"gpt-4o", "gpt-4o-mini", "gpt-4-turbo", "gpt-3.5-turbo"} <= ids


def test_unknown_paths_are_openai_404s(simulator_server: SimulatorServer) -> None:
    response = httpx2.get(f"{simulator_server.base_url}/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.asyncio
async def test_in_process_through_the_asgi_transport() -> None:
    app = create_app()
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
    client = openai.AsyncOpenAI(base_url="http://simulator/v1", api_key="sk-test", max_retries=0,
                                http_client=http)
    whole = await client.chat.completions.create(model="gpt-3.5-turbo", messages=HELLO)
    deltas, _ = await collect(await client.chat.completions.create(
        model="gpt-3.5-turbo", messages=HELLO, stream=True))

    assert "".join(deltas) == whole.choices[0].message.content
    assert whole.usage.prompt_tokens == count_messages(HELLO, "gpt-3.5-turbo")
    assert app.stats.completions == 2


def test_run_simulator_command_prints_its_url_and_serves() -> None:
    process = subprocess.Popen(
        [sys.executable, "manage.py", "run_simulator", "--port", "0", "--ttft-ms", "5"],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, text=True)
    try:
        line = json.loads(process.stdout.readline())  # type: ignore[union-attr]
        assert line["ttft_ms"] == 5
        client = openai.OpenAI(base_url=line["simulator"], api_key="sk-test", max_retries=0)
        assert answer_text(client, HELLO).startswith("You said: Hello simulator")
    finally:
        process.terminate()
        process.wait(5)


# --- mounted inside Parley (`make run`): the simulator at /simulator/v1 of the web process ----


@pytest.fixture(scope="module")
def mounted_parley(django_db_setup, django_db_blocker):
    """Parley under Daphne (as `make run` serves it) with the simulator mounted, and an
    upstream read timeout far longer than a cut may take to show."""
    from tests.liveserver import DaphneServer

    server = DaphneServer(
        SIMULATOR_MOUNTED="true", SIMULATOR_TTFT_MS="0", SIMULATOR_TPS="0",
        UPSTREAM_FIRST_TOKEN_TIMEOUT="30", UPSTREAM_READ_TIMEOUT="30",
    )
    server.start()
    yield f"http://127.0.0.1:{server.port}"
    server.stop()


@pytest.mark.django_db(transaction=True)
def test_a_cut_through_the_mounted_simulator_ends_the_turn_at_once(mounted_parley):
    from billing.defaults import install_default_prices
    from billing.models import ModelPrice
    from conversations.models import Message
    from tests.factories import make_tenant

    install_default_prices(ModelPrice)
    setup = make_tenant(base_url=f"{mounted_parley}/simulator/v1")
    with httpx2.Client(base_url=mounted_parley, headers={"Authorization": f"Bearer {setup.api_key}"},
                       timeout=20) as http:
        conversation_id = http.post("/api/v1/conversations/", json={}).json()["id"]
        for story in ("a story", "another"):  # the server still cuts at once after a cut
            started = time.monotonic()
            response = http.post(f"/api/v1/conversations/{conversation_id}/messages/",
                                 json={"content": f"Tell me {story} [[sim:cut=3]]"})
            elapsed = time.monotonic() - started
            assert response.json()["error"]["code"] == "upstream_error"  # a cut, not a read timeout
            assert elapsed < 5
    answers = Message.objects.filter(conversation_id=conversation_id, role="assistant").order_by("seq")
    assert [(a.status, a.content) for a in answers] == [
        ("incomplete", "You said: Tell"), ("incomplete", "You said: Tell")]
