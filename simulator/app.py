"""The simulator's ASGI app: routing, queued faults, stats, rate-limit headers, the prompt cache."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any

from .asgi import (
    Headers,
    Receive,
    Scope,
    Send,
    app_path,
    bearer_token,
    lifespan,
    read_body,
    send_json,
    until_disconnect,
)
from .batches import BatchApi
from .cache import DEFAULT_TTL_S, PromptCache, cache_namespace, prompt_token_sequence
from .directives import Directives
from .embeddings import embedding_body, parse_embedding_request
from .errors import ApiError, StreamCut, missing_bearer, status_error
from .moderation import moderation_body, parse_moderation_request
from .plan import plan_reply
from .request import ParsedRequest, parse_chat_request
from .stats import SimStats
from .wire import HANG_SECONDS, Reply

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4-turbo", "gpt-3.5-turbo")
RECORDED_REQUESTS = 200


@dataclass
class QueuedFault:
    directives: Directives
    remaining: int


@dataclass
class _Bucket:
    """A leaky bucket that drains over its window: what OpenAI's x-ratelimit-* headers describe."""

    limit: int
    window_s: float = 60.0
    level: float = 0.0
    last: float = field(default_factory=time.monotonic)

    def drain(self) -> None:
        now = time.monotonic()
        self.level = max(0.0, self.level - (now - self.last) * self.limit / self.window_s)
        self.last = now

    def wait_for(self, amount: int) -> float:
        """Seconds until `amount` more fits (0: it fits now)."""
        return max(0.0, self.level + amount - self.limit) * self.window_s / self.limit

    def take(self, amount: int) -> None:
        self.level += amount

    def state(self) -> tuple[int, str]:
        return max(0, self.limit - math.ceil(self.level)), _duration(self.level * self.window_s / self.limit)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


class _RateLimits:
    """The key's limits. Reported on every answer; enforced (a 429 once spent) only when a test
    or `run_simulator --rate-limit-requests` asks (``Simulator.rate_limit``)."""

    def __init__(self, requests: int = 10_000, tokens: int = 2_000_000, window_s: float = 60.0,
                 enforced: bool = False) -> None:
        self.requests, self.tokens = _Bucket(requests, window_s), _Bucket(tokens, window_s)
        self.enforced = enforced
        self._lock = threading.Lock()

    def admit(self, estimated_tokens: int) -> tuple[Headers, float | None]:
        """This answer's x-ratelimit-* headers, and how long the caller must wait when the
        limits are enforced and spent (the request is then refused and not counted)."""
        with self._lock:
            self.requests.drain()
            self.tokens.drain()
            wait = max(self.requests.wait_for(1), self.tokens.wait_for(estimated_tokens))
            refused = self.enforced and wait > 0
            if not refused:
                self.requests.take(1)
                self.tokens.take(estimated_tokens)
            remaining_requests, reset_requests = self.requests.state()
            remaining_tokens, reset_tokens = self.tokens.state()
        values = {
            "x-ratelimit-limit-requests": self.requests.limit,
            "x-ratelimit-remaining-requests": remaining_requests,
            "x-ratelimit-limit-tokens": self.tokens.limit,
            "x-ratelimit-remaining-tokens": remaining_tokens,
            "x-ratelimit-reset-requests": reset_requests,
            "x-ratelimit-reset-tokens": reset_tokens,
        }
        return [(k.encode(), str(v).encode()) for k, v in values.items()], wait if refused else None


class _CutLogFilter(logging.Filter):
    """uvicorn and Daphne log any exception from the app; a deliberate StreamCut is not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StreamCut))


_CUT_LOG_FILTER = _CutLogFilter()


class Simulator:
    """The ASGI app. Inspect ``stats`` / ``requests``; drive faults with ``inject`` / ``reset``."""

    def __init__(self, *, ttft_ms: float = 0, tokens_per_second: float = 0,
                 cache_ttl_s: float = DEFAULT_TTL_S, batches: bool = True) -> None:
        self.ttft_ms = ttft_ms
        # The Batch API (simulator/batches.py); None: a server without one (404, as vLLM answers).
        self.batches: BatchApi | None = BatchApi() if batches else None
        self.tokens_per_second = tokens_per_second
        self.stats = SimStats()
        self.requests: deque[dict[str, Any]] = deque(maxlen=RECORDED_REQUESTS)
        self.moderation_requests: deque[dict[str, Any]] = deque(maxlen=RECORDED_REQUESTS)
        self.faults: deque[QueuedFault] = deque()
        self.moderation_faults: deque[QueuedFault] = deque()
        self.cache = PromptCache(cache_ttl_s)
        self._failures: Counter[str] = Counter()
        self._rate_limits = _RateLimits()
        # Tests inject from their own thread while the server's loop consumes.
        self._lock = threading.Lock()
        for server_log in ("uvicorn.error", "daphne.server"):
            logging.getLogger(server_log).addFilter(_CUT_LOG_FILTER)

    def inject(self, *, times: int = 1, **directives: Any) -> None:
        """Queue a fault for the next ``times`` chat completions, e.g. ``inject(status=500)``."""
        with self._lock:
            self.faults.append(QueuedFault(Directives(**directives), times))

    def inject_moderation(self, *, times: int = 1, status: int | None = None,
                          retry_after: float | None = None, hang: bool = False) -> None:
        """Queue a fault for the next ``times`` moderation requests (an error status or a hang)."""
        with self._lock:
            self.moderation_faults.append(QueuedFault(
                Directives(status=status, retry_after=retry_after, hang=hang), times))

    def rate_limit(self, *, requests: int = 10_000, tokens: int = 2_000_000, window_s: float = 60.0,
                   enforced: bool = True) -> None:
        """Give the key a limit of ``requests`` calls and ``tokens`` tokens per ``window_s``:
        every answer reports what is left (x-ratelimit-*), and once it is spent, calls are
        refused with a 429 and Retry-After until it drains. ``reset`` restores the default
        (10,000 requests and 2M tokens a minute, reported only)."""
        self._rate_limits = _RateLimits(requests, tokens, window_s, enforced)

    def reset(self) -> None:
        self._rate_limits = _RateLimits()
        with self._lock:
            self.faults.clear()
            self.moderation_faults.clear()
            self._failures.clear()
            self.requests.clear()
            self.moderation_requests.clear()
            self.cache.clear()
            self.stats = SimStats()
        if self.batches is not None:
            self.batches.reset()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await lifespan(receive, send)
        if scope["type"] != "http":
            return None
        body = await read_body(receive)
        if body is None:
            return None  # the client left before sending the whole request
        try:
            await self._route(scope, body, receive, send)
        except ApiError as error:
            await send_json(send, error.status, error.body(), error.headers)

    async def _route(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        method, path = scope["method"], app_path(scope)
        if (method, path) == ("POST", "/v1/chat/completions"):
            return await self._chat(scope, body, receive, send)
        if (method, path) == ("POST", "/v1/moderations"):
            return await self._moderate(scope, body, receive, send)
        if (method, path) == ("POST", "/v1/embeddings"):
            return await self._embed(scope, body, send)
        if (method, path) == ("GET", "/v1/models"):
            _require_bearer(scope)
            return await send_json(send, 200, models_body())
        if (method, path) == ("GET", "/sim/stats"):
            return await send_json(send, 200, self.stats.as_dict())
        if (method, path) == ("GET", "/sim/requests"):
            return await send_json(send, 200, list(self.requests))
        if (method, path) == ("GET", "/sim/moderations"):
            return await send_json(send, 200, list(self.moderation_requests))
        if (method, path) == ("POST", "/sim/reset"):
            self.reset()
            return await send_json(send, 200, self.stats.as_dict())
        if self.batches is not None and path.startswith(("/v1/files", "/v1/batches")):
            _require_bearer(scope)
            if await self.batches.route(scope, method, path, body, send):
                return None
        raise ApiError(404, f"Invalid URL ({method} {path})")

    async def _chat(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.requests += 1
        limits, wait = self._rate_limits.admit(len(body) // 4)
        headers = [_request_id(), *limits]
        try:
            key = _require_bearer(scope)
            if wait is not None:
                self.stats.rate_limited += 1
                raise status_error(429, math.ceil(wait * 1000) / 1000)
            request = parse_chat_request(body)
            self.requests.append(request.body)
            fault = self._fault_for(request)
        except ApiError as error:
            self.stats.errors += 1
            return await send_json(send, error.status, error.body(), headers + error.headers)
        prompt = prompt_token_sequence(request.messages, request.model)
        cached = 0 if fault.nocache else self.cache.use(
            key, cache_namespace(request.model, request.tools), prompt)
        plan = plan_reply(request, fault, prompt_tokens=len(prompt), cached_tokens=cached,
                          ttft_ms=self.ttft_ms, tps=self.tokens_per_second)
        self.stats.prompt_tokens += plan.prompt_tokens
        self.stats.cached_tokens += plan.cached_tokens
        reply = Reply(self, plan, send, headers)
        if not await until_disconnect(reply.stream() if request.stream else reply.json(), receive):
            reply.settle("incomplete")

    def _fault_for(self, request: ParsedRequest) -> Directives:
        """The message's directives, overridden by the next queued fault. Raises ApiError."""
        with self._lock:
            fault = request.directives.overridden_by(_take(self.faults))
            if fault.status is None:
                return fault
            if fault.fail_times is not None:
                if self._failures[request.fingerprint] >= fault.fail_times:
                    return replace(fault, status=None)
                self._failures[request.fingerprint] += 1
        raise status_error(fault.status, fault.retry_after, as_date=fault.retry_after_date)

    async def _moderate(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        self.stats.moderations += 1
        headers = [_request_id()]
        try:
            _require_bearer(scope)
            request = parse_moderation_request(body)
            with self._lock:
                self.moderation_requests.append(request.body)
                fault = _take(self.moderation_faults)
            if fault.status is not None:
                raise status_error(fault.status, fault.retry_after)
        except ApiError as error:
            return await send_json(send, error.status, error.body(), headers + error.headers)
        if fault.hang:
            await until_disconnect(asyncio.sleep(HANG_SECONDS), receive)
            return None
        await send_json(send, 200, moderation_body(request), headers)

    async def _embed(self, scope: Scope, body: bytes, send: Send) -> None:
        self.stats.embeddings += 1
        _require_bearer(scope)
        await send_json(send, 200, embedding_body(parse_embedding_request(body)), [_request_id()])


def _take(faults: deque[QueuedFault]) -> Directives:
    """The head of a fault queue, consumed once (the caller holds the lock); none: no fault."""
    if not faults:
        return Directives()
    head = faults[0]
    head.remaining -= 1
    if head.remaining <= 0:
        faults.popleft()
    return head.directives


def create_app(*, ttft_ms: float = 0, tokens_per_second: float = 0,
               cache_ttl_s: float = DEFAULT_TTL_S, batches: bool = True) -> Simulator:
    return Simulator(ttft_ms=ttft_ms, tokens_per_second=tokens_per_second,
                     cache_ttl_s=cache_ttl_s, batches=batches)


def models_body() -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": model, "object": "model", "created": 1_715_367_049, "owned_by": "system"}
        for model in MODELS]}


def _request_id() -> tuple[bytes, bytes]:
    return (b"x-request-id", f"req_{uuid.uuid4().hex}".encode())


def _require_bearer(scope: Scope) -> str:
    """The API key of the request. Raises ApiError (401)."""
    token = bearer_token(scope)
    if token is None:
        raise missing_bearer()
    return token
