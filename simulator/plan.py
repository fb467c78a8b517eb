"""Planning one reply: its chunks' deltas, their tokens, the finish reason, the usage."""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from llm.tokens import count_messages, count_text

from .directives import Directives
from .grading import grading_head
from .request import ParsedRequest
from .tools import ToolCall, argument_fragments, decide_tools

DEFAULT_WORDS = 20
FILLER = (
    "the", "model", "answer", "stream", "token", "river", "light", "garden", "window", "signal",
    "paper", "cloud", "number", "simple", "bright", "quiet", "steady", "open", "clear", "small",
    "green", "north", "water", "stone", "music", "world", "story", "little", "house", "morning",
)
TEXT_OPENING = {"role": "assistant", "content": "", "refusal": None}


@dataclass
class ReplyPlan:
    id: str
    created: int
    model: str
    opening: dict[str, Any]      # the first chunk's delta: the role (and the first call's header)
    deltas: list[dict[str, Any]]  # one chunk each after the opening
    delta_tokens: list[int]      # completion tokens per delta; sums to completion_tokens
    content: str | None          # the whole message content (None for tool calls)
    tool_calls: list[dict[str, Any]]  # the whole calls, as in a non-streamed message
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    include_usage: bool
    ttft: float                  # seconds before the first byte
    interval: float              # seconds between chunks
    interruption: tuple[int, str] | None
    cached_tokens: int = 0

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0},
        }


@dataclass
class _Body:
    """What the reply says, before timing and usage are attached."""

    opening: dict[str, Any]
    deltas: list[dict[str, Any]]
    delta_tokens: list[int]
    finish_reason: str
    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def compose_words(request: ParsedRequest, count: int, head: list[str] | None = None) -> list[str]:
    """The deterministic reply, as content pieces: the head (by default the echo and the turn
    number), then seeded filler, ``count`` words in all."""
    words = list(head if head is not None else request.echo_words())
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


def _text_body(request: ParsedRequest, fault: Directives, head: list[str] | None) -> _Body:
    count = fault.words if fault.words is not None else max(DEFAULT_WORDS, len(head or ()))
    words = compose_words(request, count, head)
    pieces = fit_to_max_tokens(words, request.max_tokens, request.model)
    completion = count_text("".join(pieces), request.model)
    piece_tokens = [count_text(piece, request.model) for piece in pieces]
    if piece_tokens:
        # Per-piece counts let a cut stream bill what it sent; fold any cross-word difference
        # into the last piece so a whole reply books exactly usage.completion_tokens.
        piece_tokens[-1] += completion - sum(piece_tokens)
    return _Body(opening=TEXT_OPENING, deltas=[{"content": piece} for piece in pieces],
                 delta_tokens=piece_tokens, content="".join(pieces),
                 finish_reason="length" if len(pieces) < len(words) else "stop")


def _tool_call_body(request: ParsedRequest, calls: tuple[ToolCall, ...]) -> _Body:
    """Streamed as OpenAI does: a header per call (index, id, type, name, empty arguments), the
    first one in the role chunk, then the arguments in fragments. Tokens: the name's and each
    fragment's, booked on the call's fragments; ``max_tokens`` keeps whole chunks that fit."""
    headers, deltas, tokens = [], [], []
    for index, call in enumerate(calls):
        header = {"index": index, "id": call.id, "type": "function",
                  "function": {"name": call.name, "arguments": ""}}
        if index:
            deltas.append({"tool_calls": [header]})
            tokens.append(0)
        headers.append(header)
        for j, fragment in enumerate(argument_fragments(call.arguments)):
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
            tokens.append(count_text(fragment, request.model)
                          + (count_text(call.name, request.model) if j == 0 else 0))
    keep = _fitting(tokens, request.max_tokens)
    sent = [headers[0], *(delta["tool_calls"][0] for delta in deltas[:keep])]
    opening = {"role": "assistant", "content": None, "tool_calls": [headers[0]], "refusal": None}
    return _Body(opening=opening, deltas=deltas[:keep], delta_tokens=tokens[:keep],
                 tool_calls=_reassembled(sent),
                 finish_reason="tool_calls" if keep == len(deltas) else "length")


def _reassembled(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Whole calls from streamed parts (what a non-streamed message carries)."""
    calls: dict[int, dict[str, Any]] = {}
    for part in parts:
        if "id" in part:
            calls[part["index"]] = {"id": part["id"], "type": "function", "function": {
                "name": part["function"]["name"], "arguments": ""}}
        else:
            calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    return [calls[index] for index in sorted(calls)]


def _fitting(tokens: list[int], max_tokens: int | None) -> int:
    """How many leading chunks fit ``max_tokens``."""
    if max_tokens is None:
        return len(tokens)
    total = 0
    for keep, count in enumerate(tokens):
        total += count
        if total > max_tokens:
            return keep
    return len(tokens)


def plan_reply(
    request: ParsedRequest, fault: Directives, *, ttft_ms: float, tps: float,
    prompt_tokens: int | None = None, cached_tokens: int = 0,
) -> ReplyPlan:
    decision = decide_tools(request, fault)
    graded = grading_head(request)
    if graded is not None and not decision.calls:
        body = _text_body(request, replace(fault, words=len(graded)), graded)
    else:
        body = (_tool_call_body(request, decision.calls) if decision.calls
                else _text_body(request, fault, decision.head))
    rate = fault.tps if fault.tps is not None else tps
    return ReplyPlan(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=request.model,
        opening=body.opening, deltas=body.deltas, delta_tokens=body.delta_tokens,
        content=body.content, tool_calls=body.tool_calls, finish_reason=body.finish_reason,
        prompt_tokens=(prompt_tokens if prompt_tokens is not None
                       else count_messages(request.messages, request.model)),
        cached_tokens=cached_tokens,
        completion_tokens=sum(body.delta_tokens), include_usage=request.include_usage,
        ttft=(fault.ttft_ms if fault.ttft_ms is not None else ttft_ms) / 1000,
        interval=1 / rate if rate and rate > 0 else 0.0, interruption=fault.interruption(),
    )
