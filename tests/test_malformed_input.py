"""Malformed input on every surface — REST, `/v1`, sockets — is refused as `invalid_request`
(or the 4xx the contract gives it), never a 5xx or a socket closed with 1011: each input the
issue found as an explicit case, then Hypothesis generating more of the same kind.

Run on PostgreSQL too: it refuses NUL in text where the embedded SQLite stores it."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import quote

import httpx2
import pytest
from asgiref.sync import async_to_sync, sync_to_async
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversations.gatekeepers import access_assistant
from conversations.models import Conversation
from tests.conftest import adb

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gpt-4o-mini"
DEEP = "[" * 100_000 + "]" * 100_000  # Python's json gives up with a RecursionError
DEEP_FRAME = "[" * 5_000 + "]" * 5_000  # as deep as that, within a socket frame's size limit
TOO_DEEP = json.dumps({"title": json.loads("[" * 200 + "]" * 200)})  # parses, but deeper than we accept
NUL = "a\\u0000b"  # as it appears in JSON text
SURROGATE = "\\ud800"


def _b64(text: bytes) -> str:
    return base64.b64encode(text).decode()


@pytest.fixture
def rest(parley, tenant_factory, sim):
    """An HTTP client with a tenant's key, and one of its conversations."""
    setup = tenant_factory()
    end_user = setup.end_user("rest")
    conversation = Conversation.objects.create(
        tenant=setup.tenant, assistant=access_assistant(tenant_id=setup.tenant.pk, slug=None), end_user=end_user
    )
    headers = {"Authorization": f"Bearer {setup.api_key}", "Content-Type": "application/json"}
    with httpx2.Client(base_url=parley.url, headers=headers, timeout=20) as client:
        client.conversation_id = str(conversation.id)
        yield client


def _invalid_request(response: httpx2.Response) -> dict[str, Any]:
    assert response.status_code == 400, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == "invalid_request" and error["message"]
    return error


# --- REST ---------------------------------------------------------------------------------

REST_BODIES = [
    pytest.param("conversations", DEEP, id="deep-nesting"),
    pytest.param("conversations", TOO_DEEP, id="nested-past-the-limit"),
    pytest.param("conversations", f'{{"end_user": "{NUL}"}}', id="nul-in-end-user-id"),
    pytest.param("conversations", f'{{"title": "{NUL}"}}', id="nul-in-title"),
    pytest.param("conversations", f'{{"title": "{SURROGATE}"}}', id="surrogate-in-title"),
    pytest.param("conversations", f'{{"end_user": "{SURROGATE}"}}', id="surrogate-in-end-user-id"),
    pytest.param("messages", DEEP, id="messages-deep-nesting"),
    pytest.param("messages", f'{{"content": "{SURROGATE}"}}', id="surrogate-in-content"),
    pytest.param("messages", f'{{"content": "hi {SURROGATE} there", "stream": true}}', id="surrogate-in-streamed-content"),
    pytest.param("messages", f'{{"content": "{NUL}"}}', id="nul-in-content"),
    pytest.param("messages", f'{{"content": "hi", "client_msg_id": "{NUL}"}}', id="nul-in-client-msg-id"),
    pytest.param("token", '{"ttl": 1e400}', id="overflowing-number"),
    pytest.param("token", '{"ttl": NaN}', id="nan"),
]


def _rest_path(client: httpx2.Client, target: str, external_id: str = "someone") -> str:
    return {
        "conversations": "/api/v1/conversations/",
        "messages": f"/api/v1/conversations/{client.conversation_id}/messages/",
        "token": f"/api/v1/end-users/{external_id}/token/",
    }[target]


@pytest.mark.parametrize(("target", "body"), REST_BODIES)
def test_rest_refuses_a_malformed_body(rest, target, body):
    _invalid_request(rest.post(_rest_path(rest, target), content=body.encode()))


def test_rest_body_over_the_upload_limit_is_413(rest, settings):
    body = json.dumps({"title": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)})
    response = rest.post(_rest_path(rest, "conversations"), content=body.encode())
    assert response.status_code == 413, response.text[:300]
    assert response.json()["error"]["code"] == "invalid_request"


def test_rest_refuses_a_nul_in_an_end_user_id_in_the_path(rest):
    error = _invalid_request(rest.post(_rest_path(rest, "token", "a%00b"), content=b"{}"))
    assert "external_id" in error["message"]


def test_rest_malformed_conversation_id_answers_like_a_missing_one(rest):
    for conversation_id in ("a%00b", "%ED%A0%80", "x" * 300):
        response = rest.get(f"/api/v1/conversations/{conversation_id}/")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


BAD_CURSORS = [
    pytest.param("cD0lMDA=", id="position-is-nul"),  # p=%00
    pytest.param("cj0xJnA9eHh4", id="position-is-not-a-value"),  # r=1&p=xxx
    pytest.param(_b64(b"p=2024-13-45"), id="position-is-not-a-date"),
    pytest.param(_b64(b"\xff\xfe garbage \x00"), id="base64-of-garbage"),
    pytest.param("!!not base64!!", id="not-base64"),
    pytest.param("%00", id="nul"),
]


@pytest.mark.parametrize("listing", ["conversations", "messages"])
@pytest.mark.parametrize("cursor", BAD_CURSORS)
def test_rest_refuses_a_crafted_cursor(rest, listing, cursor):
    # Messages are ordered by seq (an integer), conversations by date: both refuse.
    url = f"{_rest_path(rest, listing)}?cursor={cursor}"
    error = _invalid_request(rest.get(url))
    assert "cursor" in error["message"] or "cursor" in error.get("fields", {})


def test_rest_a_real_cursor_still_pages(rest, tenant_factory):
    first = rest.get("/api/v1/conversations/?page_size=1")
    assert first.status_code == 200
    assert rest.get(f"/api/v1/conversations/?page_size=1&cursor={_b64(b'o=0')}").status_code == 200


# --- /v1 ----------------------------------------------------------------------------------


@pytest.fixture
def v1(parley, tenant_factory, sim):
    setup = tenant_factory()
    headers = {"Authorization": f"Bearer {setup.api_key}", "Content-Type": "application/json"}
    with httpx2.Client(base_url=parley.openai_base_url, headers=headers, timeout=20) as client:
        yield client


def _completion(**fields: str) -> str:
    """A request body as JSON text, with some fields given as raw JSON."""
    parts = {"model": json.dumps(MODEL), "messages": '[{"role": "user", "content": "hi"}]', **fields}
    return "{" + ", ".join(f'"{name}": {value}' for name, value in parts.items()) + "}"


V1_BODIES = [
    pytest.param(DEEP, id="deep-nesting"),
    pytest.param(_completion(metadata=json.dumps(json.loads("[" * 200 + "]" * 200))), id="nested-past-the-limit"),
    pytest.param(_completion(model=f'"{NUL}"'), id="nul-in-model"),
    pytest.param(_completion(user=f'"{NUL}"'), id="nul-in-user"),
    pytest.param(_completion(user=f'"{SURROGATE}"'), id="surrogate-in-user"),
    pytest.param(_completion(messages=f'[{{"role": "user", "content": "{SURROGATE}"}}]'), id="surrogate-in-content"),
    pytest.param(
        _completion(messages=f'[{{"role": "user", "content": [{{"type": "text", "text": "{SURROGATE}"}}]}}]'),
        id="surrogate-in-a-content-part",
    ),
    pytest.param(_completion(messages=f'[{{"role": "user", "content": "{NUL}"}}]'), id="nul-in-content"),
    pytest.param(_completion(temperature="1e400"), id="overflowing-number"),
    pytest.param(_completion(temperature="NaN"), id="nan"),
    pytest.param(_completion(max_tokens="1" + "0" * 30), id="huge-max-tokens"),
    pytest.param(_completion(max_completion_tokens="1" + "0" * 30), id="huge-max-completion-tokens"),
    pytest.param(_completion(n="1000000000", max_tokens="2000000000"), id="huge-n"),
]


@pytest.mark.parametrize("body", V1_BODIES)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_v1_refuses_a_malformed_body(v1, sim, body, stream):
    if stream and body.startswith("{"):
        body = body[:-1] + ', "stream": true}'
    response = v1.post("/chat/completions", content=body.encode())
    assert response.status_code == 400, (response.status_code, response.text)
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request") and error["message"]
    assert not sim.requests  # refused before anything reached the provider


# --- sockets ------------------------------------------------------------------------------

SOCKET_FRAMES = [
    pytest.param(DEEP_FRAME, id="deep-nesting"),
    pytest.param('{"type": "message.create", "content": ' + DEEP_FRAME + "}", id="deep-content"),
    pytest.param(json.dumps({"type": "message.create", "content": json.loads("[" * 200 + "]" * 200)}), id="nested-past-the-limit"),
    pytest.param(f'{{"type": "message.create", "content": "{SURROGATE}"}}', id="surrogate-in-content"),
    pytest.param(f'{{"type": "message.create", "content": "{NUL}"}}', id="nul-in-content"),
    pytest.param(f'{{"type": "message.create", "content": "hi", "assistant": "{NUL}"}}', id="nul-in-assistant"),
    pytest.param(f'{{"type": "message.create", "content": "hi", "assistant": "{SURROGATE}"}}', id="surrogate-in-assistant"),
    pytest.param(f'{{"type": "message.create", "content": "hi", "client_msg_id": "{SURROGATE}"}}', id="surrogate-in-client-msg-id"),
    pytest.param(f'{{"type": "conversation.join", "conversation_id": "{NUL}"}}', id="nul-in-conversation-id"),
    pytest.param('{"type": "message.create", "content": "hi", "conversation_id": 1e400}', id="overflowing-number"),
    pytest.param('{"type": "message.create", "content": NaN}', id="nan"),
    pytest.param('{"type": {"message.create": 1}, "content": "hi"}', id="object-as-type"),
    pytest.param('{"type": ["message.create"], "content": "hi"}', id="array-as-type"),
]


async def _answers_invalid_request(socket, frame: str) -> dict[str, Any]:
    """Send one frame; the answer is an `invalid_request` error and the socket is still open."""
    await socket.send_text(frame)
    output = await socket.communicator.receive_output(timeout=5)
    assert output["type"] == "websocket.send", output  # not websocket.close (1011)
    error = json.loads(output["text"])
    assert error["type"] == "error" and error["code"] == "invalid_request" and error["message"], error
    return error


@pytest.mark.parametrize("frame", SOCKET_FRAMES)
async def test_socket_refuses_a_malformed_frame_and_stays_open(tenant_factory, chat, sim, frame):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        await _answers_invalid_request(socket, frame)
        assert (await socket.turn("still there?"))[-1]["type"] == "message.completed"
    assert await adb(Conversation.objects.count)() == 1  # only the real turn made one


# --- fuzzing: Hypothesis over the three surfaces ------------------------------------------

FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # a flaky test is a bug: the same examples every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Strings no surface can store or send on: NUL, lone surrogates (alone or inside text).
BAD_TEXT = st.one_of(
    st.sampled_from(["\x00", "\ud800", "\udfff", "a\x00", "x\udc00y"]),
    st.tuples(st.text(max_size=5), st.sampled_from(["\x00", "\ud800", "\udbff"]), st.text(max_size=5)).map("".join),
)
# Anything JSON can carry, including what Python's json lets through by default.
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), BAD_TEXT,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=10,
)


@st.composite
def nested(draw: st.DrawFn) -> str:
    """A value nested past any sane depth, as JSON text (json.dumps would refuse to write it)."""
    depth = draw(st.integers(min_value=65, max_value=3_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    return opener * depth + "1" + closer * depth


# Values no field of any surface accepts: every field is a string, a boolean or an integer,
# never a container, and no string may hold NUL or a lone surrogate. (No None, no plain string,
# no bare boolean: a body with one of those could be a valid request.)
MALFORMED = st.one_of(
    BAD_TEXT,
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=10**20, max_value=10**40),
    st.lists(JSON_VALUES, max_size=3),
    st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3),
)


def _json_text(value: Any) -> str:
    return json.dumps(value)  # NaN and Infinity come out as Python writes them: not JSON


def _object_with(fields: dict[str, Any], key: str, value: Any) -> str:
    return _json_text({**fields, key: value})


def _malformed(fields: dict[str, Any]) -> st.SearchStrategy[str]:
    """A valid body with one field replaced by something malformed (wrong type, bad text,
    huge or non-finite number, deep nesting), or garbage where the body should be."""
    keys = st.sampled_from([*fields, "surprise"])
    return st.one_of(
        st.builds(_object_with, st.just(fields), keys, MALFORMED),
        st.builds(lambda key, deep: _json_text(fields)[:-1] + f', "{key}": {deep}}}', keys, nested()),
        nested(),
        st.text(max_size=20),
    )


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # what a careless client would send


def _is_a_client_error(response: httpx2.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert "error" in response.json()


def test_rest_fuzzed_bodies_and_cursors_are_client_errors(rest):
    bodies = {
        "conversations": {"title": "t", "end_user": "u", "assistant": "default"},
        "messages": {"content": "hi", "stream": False, "client_msg_id": "c"},
        "token": {"ttl": 60},
    }
    requests = st.one_of(*(st.tuples(st.just(_rest_path(rest, target)), _malformed(body)) for target, body in bodies.items()))

    @FUZZ
    @given(request=requests)
    def post(request: tuple[str, str]) -> None:
        path, body = request
        _is_a_client_error(rest.post(path, content=_raw(body)))

    @FUZZ
    @given(
        path=st.sampled_from([_rest_path(rest, "conversations"), _rest_path(rest, "messages")]),
        cursor=st.one_of(st.binary(max_size=40).map(_b64), st.text(max_size=20), BAD_TEXT),
    )
    def page(path: str, cursor: str) -> None:
        if cursor in {"", "AA=="}:  # no cursor at all, or one that decodes to no position: page one
            return
        _is_a_client_error(rest.get(f"{path}?cursor={quote(_raw(cursor))}"))

    post()
    page()


def test_v1_fuzzed_bodies_are_client_errors(v1, sim):
    valid = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "user": "u", "stream": False}

    @FUZZ
    @given(body=_malformed(valid))
    def call(body: str) -> None:
        _is_a_client_error(v1.post("/chat/completions", content=_raw(body)))

    call()


# Frames that each hold something malformed, so that none of them starts a turn.
BAD_FRAMES = st.one_of(
    _malformed({"type": "message.create", "content": "hi", "conversation_id": None, "assistant": None, "client_msg_id": "c"}),
    _malformed({"type": "conversation.join", "conversation_id": "2c5a4e0e-5d43-4a8e-9b0a-3f1f3c1a9e11"}),
    _malformed({"type": "generation.cancel", "conversation_id": "2c5a4e0e-5d43-4a8e-9b0a-3f1f3c1a9e11"}),
)


async def _answers_an_error(socket, frame: str) -> None:
    """Send one frame; the answer is an error frame (a well-formed join of an unknown
    conversation is `not_found`) and the socket is still open."""
    await socket.send_text(frame)
    output = await socket.communicator.receive_output(timeout=5)
    assert output["type"] == "websocket.send", output  # not websocket.close (1011)
    error = json.loads(output["text"])
    assert error["type"] == "error" and error["code"] in {"invalid_request", "not_found"}, error


async def test_socket_fuzzed_frames_answer_invalid_request_and_the_socket_stays_open(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:

        @FUZZ
        @given(frame=BAD_FRAMES)
        def probe(frame: str) -> None:
            # Hypothesis runs synchronously (in a thread); each frame goes over this loop's socket.
            async_to_sync(_answers_an_error)(socket, frame)

        await sync_to_async(probe, thread_sensitive=False)()
        assert (await socket.turn("still there?"))[-1]["type"] == "message.completed"
