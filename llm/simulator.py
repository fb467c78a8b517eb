"""An OpenAI-compatible Chat Completions upstream, as a raw ASGI app: deterministic and faultable.

Used as the model in tests, the demo and benchmarks; the real `openai` SDK parses every byte.

Endpoints
---------
- ``POST /v1/chat/completions`` (``Authorization: Bearer <non-empty>``): a ``chat.completion``
  object, or with ``stream: true`` a ``text/event-stream`` framed like OpenAI's: a role chunk,
  one content chunk per word (the word with its leading space), a chunk with an empty delta and
  ``finish_reason``, a ``choices: []`` usage chunk only when ``stream_options.include_usage``
  (earlier chunks then carry ``"usage": null``), and ``data: [DONE]``.
- ``GET /v1/models`` (bearer required): gpt-4o, gpt-4o-mini, gpt-4-turbo, gpt-3.5-turbo.
- ``GET /sim/stats``, ``POST /sim/reset``, ``GET /sim/requests`` (no auth): the counters, a
  reset, and the recorded request bodies, for tests that run the simulator out of process.
- Anything else: 404 with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.

Mounted inside another ASGI app, paths are matched below the scope's ``root_path``.

The reply
---------
Deterministic in the messages: ``You said: <first 8 words of the last user message>. (turn N)``
(N = user messages seen) followed by filler words drawn from a small list with a seed hashed from
all messages (directives stripped), 20 words in all. ``max_tokens`` / ``max_completion_tokens``
keep the longest word prefix whose tiktoken count fits and answer ``finish_reason: "length"``.
``usage.prompt_tokens`` is ``llm.tokens.count_messages``; ``completion_tokens`` is
``count_text`` of the generated text. Every chat completion response (success or error) carries
``x-request-id`` and the ``x-ratelimit-*`` headers (a per-app token bucket; plausible values).

Timing: the app waits ``ttft_ms``, then sends the headers, the role chunk and the first content
chunk together (as OpenAI does: headers arrive with the first token, so an SDK timeout before
the first token surfaces from ``create()``); later chunks are paced at ``tokens_per_second``
(0 = no delay). A non-streamed answer waits for the whole generation. Only ``asyncio.sleep``.

Directives
----------
Written in the LAST user message as ``[[sim:KEY=VALUE KEY=VALUE]]`` (several blocks merge); they
are stripped from the echoed text and from the reply seed. A malformed directive is a 400.

=================  ==========================================================================
``status=S``       answer HTTP S with OpenAI's error body before any byte of the reply
                   (5xx: ``server_error``; 429: ``rate_limit_error`` / ``rate_limit_exceeded``;
                   401: ``invalid_api_key``; other 4xx: ``invalid_request_error``)
``retry_after=T``  with ``status``: ``retry-after`` (seconds) and ``retry-after-ms`` headers
``fail_times=K``   with ``status``: fail only the first K requests with this exact model,
                   messages and directive (the fingerprint), then answer normally
``hang=1``         accept the request, never send headers (sleeps 1 h; cancelled on disconnect)
``hang_after=N``   stream N content chunks, then hang
``cut=N``          stream N content chunks, then drop the connection (no finish, usage, [DONE])
``malformed=N``    after N content chunks send ``data: {this is not json``, end the body
``words=N``        the reply is exactly N words (N content chunks)
``ttft_ms=MS``     per-request time to first token
``tps=R``          per-request chunks per second (0 = unpaced)
=================  ==========================================================================

How faults reach the ``openai`` SDK (3.57, httpx2) over uvicorn: ``cut`` raises StreamCut from
the app after the response started; uvicorn closes the socket without the terminating chunk
(its traceback log is filtered out), and iterating the stream yields the N deltas, then raises
``openai.APIConnectionError`` (cause: httpx2 ``RemoteProtocolError``, incomplete chunked read).
``malformed`` raises ``json.JSONDecodeError`` from the iteration, after the N deltas. ``hang``
ends in ``openai.APITimeoutError`` at the client's timeout. Non-streamed: ``hang_after`` hangs
too, ``cut`` sends half the JSON body then drops the connection (``APIConnectionError``), and
``malformed`` answers 200 with a non-JSON body (``json.JSONDecodeError``). Through httpx2's
in-process ``ASGITransport`` (which buffers whole responses) ``cut`` raises StreamCut itself.

Programmatic faults and stats
-----------------------------
``app.inject(status=500, times=1)``, ``app.inject(hang=True)``, ``app.inject(cut=3)`` … queue
faults (the directive keys as keyword arguments) in ``app.faults``; each valid chat completion
request consumes the head of the queue FIFO, its fields overriding the message's directives.
``app.stats`` counts requests (every chat completion POST), completions (answered to the end),
incomplete (cut, hang, malformed, client disconnect), errors (4xx/5xx answered) and the tokens
served: the full prompt tokens of every reply begun (error answers excluded) and the completion
tokens of the content chunks actually sent (a broken non-streamed answer delivers none). Each
chunk is booked right after it is sent, a completion before its ``[DONE]``: a client that has
read to the end finds the stats final. ``app.requests`` keeps the last 200 valid request bodies
(injected failures included). ``app.reset()`` clears faults, stats, failure counts and requests.

The request path is ``parse_chat_request`` → ``plan_reply`` (a ReplyPlan) → ``_Reply.stream`` /
``_Reply.json``, so what comes later slots in: tool calls streamed in fragments (plan + render),
``/v1/moderations`` (a route), prompt-prefix caching (``ReplyPlan.usage`` cached_tokens).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, NoReturn

from llm.tokens import count_messages, count_text

Scope = MutableMapping[str, Any]
AsgiMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[AsgiMessage]]
Send = Callable[[AsgiMessage], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4-turbo", "gpt-3.5-turbo")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
DEFAULT_WORDS = 20
ECHO_WORDS = 8
HANG_SECONDS = 3600.0
RECORDED_REQUESTS = 200
SYSTEM_FINGERPRINT = "fp_parleysim"
FILLER = (
    "the", "model", "answer", "stream", "token", "river", "light", "garden", "window", "signal",
    "paper", "cloud", "number", "simple", "bright", "quiet", "steady", "open", "clear", "small",
    "green", "north", "water", "stone", "music", "world", "story", "little", "house", "morning",
)
_DIRECTIVE = re.compile(r"\[\[sim:([^\]]*)\]\]")


class ApiError(Exception):
    """An OpenAI-shaped error answer: HTTP status plus ``{"error": {...}}``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        error_type: str | None = None, headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type = error_type or _error_type(status)
        self.headers = headers or []

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class StreamCut(Exception):
    """Raised on purpose after the response started, so the server drops the connection."""


def _error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return "rate_limit_error" if status == 429 else "invalid_request_error"


def _status_error(status: int, retry_after: float | None) -> ApiError:
    """The error OpenAI would answer with this status (injected faults)."""
    headers: Headers = []
    if retry_after is not None:
        headers += [(b"retry-after", _number(retry_after).encode()),
                    (b"retry-after-ms", str(round(retry_after * 1000)).encode())]
    if status == 429:
        return ApiError(429, "Rate limit reached for requests (simulated). Please try again later.",
                        code="rate_limit_exceeded", headers=headers)
    if status == 401:
        return ApiError(401, "Incorrect API key provided (simulated).", code="invalid_api_key",
                        headers=headers)
    if status >= 500:
        return ApiError(status, "The server had an error while processing your request "
                                "(simulated).", headers=headers)
    return ApiError(status, f"Simulated error {status}.", headers=headers)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


# ---------------------------------------------------------------------------------------------
# Directives


@dataclass(frozen=True)
class Directives:
    """Faults and overrides for one request; None / False means "not asked for"."""

    status: int | None = None
    retry_after: float | None = None
    fail_times: int | None = None
    hang: bool = False
    hang_after: int | None = None
    cut: int | None = None
    malformed: int | None = None
    words: int | None = None
    ttft_ms: float | None = None
    tps: float | None = None

    def overridden_by(self, other: Directives) -> Directives:
        changes = {f.name: getattr(other, f.name) for f in fields(other)
                   if getattr(other, f.name) not in (None, False)}
        return replace(self, **changes)

    def interruption(self) -> tuple[int, str] | None:
        """(content chunks to send first, "cut" | "malformed" | "hang"), the earliest asked for."""
        if self.hang:
            return (0, "hang")
        asked = [(n, kind) for n, kind in
                 ((self.cut, "cut"), (self.malformed, "malformed"), (self.hang_after, "hang"))
                 if n is not None]
        return min(asked, key=lambda item: item[0]) if asked else None


_DIRECTIVE_TYPES: dict[str, Callable[[str], Any]] = {
    "status": int, "retry_after": float, "fail_times": int, "hang_after": int, "cut": int,
    "malformed": int, "words": int, "ttft_ms": float, "tps": float,
    "hang": lambda value: value not in ("0", "false"),
}


def parse_directives(text: str) -> tuple[Directives, str]:
    """Directives found in ``text`` and the text without them. Raises ApiError (400)."""
    values: dict[str, Any] = {}
    for block in _DIRECTIVE.findall(text):
        for item in block.split():
            key, _, raw = item.partition("=")
            try:
                values[key] = _DIRECTIVE_TYPES[key](raw)
            except (KeyError, ValueError):
                raise ApiError(400, f"Invalid simulator directive {item!r}.",
                               param="messages") from None
    return Directives(**values), " ".join(_DIRECTIVE.sub(" ", text).split())


# ---------------------------------------------------------------------------------------------
# Parsing the request


@dataclass
class ParsedRequest:
    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    directives: Directives
    echo: str           # the last user message, directives stripped
    user_turns: int
    seed: bytes         # hash of the messages without directives: the same chat, the same answer
    fingerprint: str    # hash of model + raw messages: what fail_times counts


def message_text(message: dict[str, Any]) -> str:
    """Text of a message whose content is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def parse_chat_request(raw: bytes) -> ParsedRequest:
    """Validate a chat completion body the way OpenAI does (the parts we model). Raises ApiError."""
    body = _json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "you must provide a model parameter", param="model")
    messages = _valid_messages(body.get("messages"))
    stream = _valid_bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is "
                            "enabled.", param="stream_options")
    users = [m for m in messages if m["role"] == "user"]
    directives, echo = parse_directives(message_text(users[-1])) if users else (Directives(), "")
    cleaned = [{**m, "content": _DIRECTIVE.sub("", message_text(m))} for m in messages]
    return ParsedRequest(
        body=body, model=model, messages=messages, stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        max_tokens=_max_tokens(body), directives=directives, echo=echo, user_turns=len(users),
        seed=_digest(cleaned),
        fingerprint=_digest([model, messages]).hex(),
    )


def _digest(value: Any) -> bytes:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise ApiError(400, "We could not parse the JSON body of your request. The OpenAI API "
                            "expects a JSON payload.")
    return body


def _valid_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise ApiError(400, "Missing required parameter: 'messages'.", param="messages",
                       code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "Invalid 'messages': expected a non-empty array.", param="messages",
                       code="empty_array" if messages == [] else "invalid_type")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ApiError(400, f"Missing required parameter: 'messages[{i}].role'.",
                           param=f"messages[{i}].role", code="missing_required_parameter")
        if message["role"] not in ROLES:
            raise ApiError(400, f"Invalid value: {message['role']!r}. Supported values are: "
                                f"{', '.join(sorted(ROLES))}.", param=f"messages[{i}].role",
                           code="invalid_value")
    return messages


def _valid_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"Invalid type for '{name}': expected a boolean.", param=name,
                       code="invalid_type")
    return bool(value)


def _max_tokens(body: dict[str, Any]) -> int | None:
    """max_completion_tokens (the newer name) wins over max_tokens, as in OpenAI's API."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ApiError(400, f"Invalid '{name}': expected an integer >= 1, got {value!r}.",
                           param=name, code="integer_below_min_value")
        return value
    return None


# ---------------------------------------------------------------------------------------------
# Planning the reply


@dataclass
class ReplyPlan:
    id: str
    created: int
    model: str
    pieces: list[str]            # one content chunk each: a word with its leading space
    piece_tokens: list[int]      # tokens billed per piece; sums to completion_tokens
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    include_usage: bool
    ttft: float                  # seconds before the first byte
    interval: float              # seconds between content chunks
    interruption: tuple[int, str] | None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0},
        }


def compose_words(request: ParsedRequest, count: int) -> list[str]:
    """The deterministic reply, as content pieces: echo, turn number, seeded filler."""
    echoed = request.echo.split()[:ECHO_WORDS] or ["nothing"]
    echoed[-1] = echoed[-1].rstrip(".!?,;:") + "."
    words = ["You", "said:", *echoed, "(turn", f"{request.user_turns})"]
    rng = random.Random(request.seed)
    while len(words) < count:
        words.append(rng.choice(FILLER))
    words = words[:count]
    return words[:1] + [" " + word for word in words[1:]]


def fit_to_max_tokens(pieces: list[str], max_tokens: int | None, model: str) -> list[str]:
    """The longest prefix of the pieces whose token count fits ``max_tokens``."""
    if max_tokens is None:
        return pieces
    # Summing per-piece counts keeps this linear; the exact count of the prefix then has the
    # last word (BPE rarely merges across a space, but a bill must never pass max_tokens).
    keep, total = 0, 0
    for tokens in (count_text(piece, model) for piece in pieces):
        if total + tokens > max_tokens:
            break
        keep, total = keep + 1, total + tokens
    while keep and count_text("".join(pieces[:keep]), model) > max_tokens:
        keep -= 1
    return pieces[:keep]


def plan_reply(
    request: ParsedRequest, fault: Directives, *, ttft_ms: float, tps: float,
) -> ReplyPlan:
    words = compose_words(request, fault.words if fault.words is not None else DEFAULT_WORDS)
    pieces = fit_to_max_tokens(words, request.max_tokens, request.model)
    completion = count_text("".join(pieces), request.model)
    piece_tokens = [count_text(piece, request.model) for piece in pieces]
    if piece_tokens:
        # Per-piece counts let a cut stream bill what it sent; fold any cross-word difference
        # into the last piece so a whole reply books exactly usage.completion_tokens.
        piece_tokens[-1] += completion - sum(piece_tokens)
    rate = fault.tps if fault.tps is not None else tps
    return ReplyPlan(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=request.model,
        pieces=pieces, piece_tokens=piece_tokens,
        finish_reason="length" if len(pieces) < len(words) else "stop",
        prompt_tokens=count_messages(request.messages, request.model),
        completion_tokens=completion, include_usage=request.include_usage,
        ttft=(fault.ttft_ms if fault.ttft_ms is not None else ttft_ms) / 1000,
        interval=1 / rate if rate and rate > 0 else 0.0, interruption=fault.interruption(),
    )


# ---------------------------------------------------------------------------------------------
# Rendering


def completion_body(plan: ReplyPlan) -> dict[str, Any]:
    return {
        "id": plan.id, "object": "chat.completion", "created": plan.created, "model": plan.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": plan.text,
                                             "refusal": None, "annotations": []},
                     "logprobs": None, "finish_reason": plan.finish_reason}],
        "usage": plan.usage(), "service_tier": "default", "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def chunk_event(plan: ReplyPlan, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    chunk: dict[str, Any] = {
        "id": plan.id, "object": "chat.completion.chunk", "created": plan.created,
        "model": plan.model, "service_tier": "default", "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if plan.include_usage:
        chunk["usage"] = None
    return sse(chunk)


def usage_event(plan: ReplyPlan) -> bytes:
    return sse({
        "id": plan.id, "object": "chat.completion.chunk", "created": plan.created,
        "model": plan.model, "service_tier": "default", "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [], "usage": plan.usage(),
    })


def dumps(payload: Any) -> bytes:
    """Compact JSON, as OpenAI writes it."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + dumps(payload) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
MALFORMED_EVENT = b"data: {this is not json\n\n"


async def send_json(send: Send, status: int, payload: Any, headers: Headers | None = None) -> None:
    body = dumps(payload)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# State: stats, queued faults, rate-limit headers


@dataclass
class SimStats:
    requests: int = 0
    completions: int = 0
    incomplete: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class QueuedFault:
    directives: Directives
    remaining: int


@dataclass
class _Bucket:
    """A leaky bucket refilled over a minute: what OpenAI's x-ratelimit-* headers describe."""

    limit: int
    level: float = 0.0
    last: float = field(default_factory=time.monotonic)

    def take(self, amount: int) -> tuple[int, str]:
        now = time.monotonic()
        self.level = max(0.0, self.level - (now - self.last) * self.limit / 60) + amount
        self.last = now
        return max(0, self.limit - math.ceil(self.level)), _duration(self.level * 60 / self.limit)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


class _RateLimits:
    def __init__(self, requests: int = 10_000, tokens: int = 2_000_000) -> None:
        self.requests, self.tokens = _Bucket(requests), _Bucket(tokens)

    def headers(self, estimated_tokens: int) -> Headers:
        remaining_requests, reset_requests = self.requests.take(1)
        remaining_tokens, reset_tokens = self.tokens.take(estimated_tokens)
        values = {
            "x-ratelimit-limit-requests": self.requests.limit,
            "x-ratelimit-remaining-requests": remaining_requests,
            "x-ratelimit-limit-tokens": self.tokens.limit,
            "x-ratelimit-remaining-tokens": remaining_tokens,
            "x-ratelimit-reset-requests": reset_requests,
            "x-ratelimit-reset-tokens": reset_tokens,
        }
        return [(k.encode(), str(v).encode()) for k, v in values.items()]


class _CutLogFilter(logging.Filter):
    """uvicorn logs any exception from the app; a deliberate StreamCut is not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamCut))


_CUT_LOG_FILTER = _CutLogFilter()


# ---------------------------------------------------------------------------------------------
# One reply on the wire


class _Reply:
    """Renders one plan as a stream or a JSON body; books it in the stats exactly once."""

    def __init__(self, sim: Simulator, plan: ReplyPlan, send: Send, headers: Headers) -> None:
        self.sim, self.plan, self.send, self.headers = sim, plan, send, headers
        self.outcome: str | None = None
        self.stop_at, self.action = plan.interruption or (len(plan.pieces), "")

    def settle(self, outcome: str) -> None:
        """Book "completed" or "incomplete" once: a hang may later also see a disconnect."""
        if self.outcome is None:
            self.outcome = outcome
            if outcome == "completed":
                self.sim.stats.completions += 1
            else:
                self.sim.stats.incomplete += 1

    async def stream(self) -> None:
        plan = self.plan
        if self.action == "hang" and self.stop_at == 0:
            await self._hang()
        await asyncio.sleep(plan.ttft)
        await self._start("text/event-stream; charset=utf-8")
        role = {"role": "assistant", "content": "", "refusal": None}
        await _body(self.send, chunk_event(plan, role))
        start = asyncio.get_running_loop().time()
        for i, piece in enumerate(plan.pieces[: self.stop_at]):
            await _sleep_until(start + i * plan.interval)
            await _body(self.send, chunk_event(plan, {"content": piece}))
            # Booked right after the send and before any other await: a client that has seen
            # this chunk and then reads the stats finds it counted.
            self.sim.stats.completion_tokens += plan.piece_tokens[i]
        if self.action:
            return await self._interrupt_stream()
        await _body(self.send, chunk_event(plan, {}, plan.finish_reason))
        if plan.include_usage:
            await _body(self.send, usage_event(plan))
        self.settle("completed")
        await self.send({"type": "http.response.body", "body": DONE_EVENT})

    async def _interrupt_stream(self) -> None:
        if self.action == "cut":
            self._cut()
        if self.action == "malformed":
            self.settle("incomplete")
            return await self.send({"type": "http.response.body", "body": MALFORMED_EVENT})
        await self._hang()

    async def json(self) -> None:
        plan = self.plan
        if self.action == "hang":
            await self._hang()
        # A non-streamed answer arrives when the whole generation is done.
        await asyncio.sleep(plan.ttft + plan.interval * max(0, len(plan.pieces) - 1))
        if self.action == "malformed":
            self.settle("incomplete")
            await self._start("application/json")
            return await self.send({"type": "http.response.body", "body": b"{this is not json"})
        body = dumps(completion_body(plan))
        await self._start("application/json", content_length=len(body))
        if self.action == "cut":
            await _body(self.send, body[: len(body) // 2])
            self._cut()
        self.sim.stats.completion_tokens += plan.completion_tokens
        self.settle("completed")
        await self.send({"type": "http.response.body", "body": body})

    async def _start(self, content_type: str, content_length: int | None = None) -> None:
        headers = [(b"content-type", content_type.encode()), *self.headers]
        if content_length is not None:
            headers.append((b"content-length", str(content_length).encode()))
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _hang(self) -> None:
        self.settle("incomplete")
        await asyncio.sleep(HANG_SECONDS)  # until the client gives up and disconnects

    def _cut(self) -> NoReturn:
        self.settle("incomplete")
        raise StreamCut("simulated connection cut")


# ---------------------------------------------------------------------------------------------
# The app


class Simulator:
    """The ASGI app. Inspect ``stats`` / ``requests``; drive faults with ``inject`` / ``reset``."""

    def __init__(self, *, ttft_ms: float = 0, tokens_per_second: float = 0) -> None:
        self.ttft_ms = ttft_ms
        self.tokens_per_second = tokens_per_second
        self.stats = SimStats()
        self.requests: deque[dict[str, Any]] = deque(maxlen=RECORDED_REQUESTS)
        self.faults: deque[QueuedFault] = deque()
        self._failures: Counter[str] = Counter()
        self._rate_limits = _RateLimits()
        # Tests inject from their own thread while the server's loop consumes.
        self._lock = threading.Lock()
        logging.getLogger("uvicorn.error").addFilter(_CUT_LOG_FILTER)

    def inject(self, *, times: int = 1, **directives: Any) -> None:
        """Queue a fault for the next ``times`` chat completions, e.g. ``inject(status=500)``."""
        with self._lock:
            self.faults.append(QueuedFault(Directives(**directives), times))

    def reset(self) -> None:
        with self._lock:
            self.faults.clear()
            self._failures.clear()
            self.requests.clear()
            self.stats = SimStats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":
            return None
        body = await _read_body(receive)
        if body is None:
            return None  # the client left before sending the whole request
        try:
            await self._route(scope, body, receive, send)
        except ApiError as error:
            await send_json(send, error.status, error.body(), error.headers)

    async def _route(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        method, path = scope["method"], _app_path(scope)
        if (method, path) == ("POST", "/v1/chat/completions"):
            return await self._chat(scope, body, receive, send)
        if (method, path) == ("GET", "/v1/models"):
            _require_bearer(scope)
            return await send_json(send, 200, models_body())
        if (method, path) == ("GET", "/sim/stats"):
            return await send_json(send, 200, self.stats.as_dict())
        if (method, path) == ("GET", "/sim/requests"):
            return await send_json(send, 200, list(self.requests))
        if (method, path) == ("POST", "/sim/reset"):
            self.reset()
            return await send_json(send, 200, self.stats.as_dict())
        raise ApiError(404, f"Invalid URL ({method} {path})")

    async def _chat(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.requests += 1
        headers = [(b"x-request-id", f"req_{uuid.uuid4().hex}".encode()),
                   *self._rate_limits.headers(len(body) // 4)]
        try:
            _require_bearer(scope)
            request = parse_chat_request(body)
            self.requests.append(request.body)
            fault = self._fault_for(request)
        except ApiError as error:
            self.stats.errors += 1
            return await send_json(send, error.status, error.body(), headers + error.headers)
        plan = plan_reply(request, fault, ttft_ms=self.ttft_ms, tps=self.tokens_per_second)
        self.stats.prompt_tokens += plan.prompt_tokens
        reply = _Reply(self, plan, send, headers)
        if not await _until_disconnect(reply.stream() if request.stream else reply.json(), receive):
            reply.settle("incomplete")

    def _fault_for(self, request: ParsedRequest) -> Directives:
        """The message's directives, overridden by the next queued fault. Raises ApiError."""
        with self._lock:
            fault = request.directives
            if self.faults:
                head = self.faults[0]
                head.remaining -= 1
                if head.remaining <= 0:
                    self.faults.popleft()
                fault = fault.overridden_by(head.directives)
            if fault.status is None:
                return fault
            if fault.fail_times is not None:
                if self._failures[request.fingerprint] >= fault.fail_times:
                    return replace(fault, status=None)
                self._failures[request.fingerprint] += 1
        raise _status_error(fault.status, fault.retry_after)


def create_app(*, ttft_ms: float = 0, tokens_per_second: float = 0) -> Simulator:
    return Simulator(ttft_ms=ttft_ms, tokens_per_second=tokens_per_second)


def models_body() -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": model, "object": "model", "created": 1_715_367_049, "owned_by": "system"}
        for model in MODELS]}


def _app_path(scope: Scope) -> str:
    """The path below the mount point: honours ``root_path`` when mounted inside another app."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _require_bearer(scope: Scope) -> None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return
    raise ApiError(401, "You didn't provide an API key. You need to provide your API key in an "
                        "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                        "YOUR_KEY).", code="invalid_api_key")


# ---------------------------------------------------------------------------------------------
# ASGI plumbing


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            return await send({"type": "lifespan.shutdown.complete"})


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _body(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _sleep_until(deadline: float) -> None:
    # Sleeping to absolute deadlines keeps the pace from drifting over a long reply.
    delay = deadline - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(work: Awaitable[None], receive: Receive) -> bool:
    """Run ``work``; cancel it if the client goes away. False when it was cut short that way.

    uvicorn silently drops sends after a disconnect, so without this a hung or paced reply
    would keep "streaming" to nobody. Exceptions of ``work`` (StreamCut) propagate.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # server shutdown: take the reply down with us
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    finished = task.done()
    if not finished:
        task.cancel()
    await asyncio.gather(task, watcher, return_exceptions=True)
    if finished:
        task.result()  # re-raise StreamCut and real bugs
    return finished
