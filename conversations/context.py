"""Prompt assembly: the static prefix, then the most recent messages that fit the window.

Reads newest-first in growing batches and stops as soon as the budget is full, using the token
count stored on each message when it was written: a turn costs O(window), not O(history).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm.tokens import TOKENS_REPLY_PRIMING, count_message

from .models import Assistant, Conversation, Message

# Room left for the count's own error (framing differences across models, name fields).
SAFETY_MARGIN_TOKENS = 64
FIRST_BATCH = 64
MAX_BATCH = 4096

# What is replayed to the model: answers that were cut short still carry context; blocked
# and failed messages never go back upstream.
REPLAYED_STATUSES = (Message.Status.COMPLETE, Message.Status.INCOMPLETE)


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, Any]]
    tokens: int  # prompt tokens by our count, framing and reply priming included
    history_messages: int  # how many stored messages made it in


def system_messages(assistant: Assistant) -> list[dict[str, Any]]:
    if not assistant.system_prompt:
        return []
    return [{"role": "system", "content": assistant.system_prompt}]


def as_api_message(role: str, content: str, tool_calls: Any, tool_call_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if tool_call_id:
        message["tool_call_id"] = tool_call_id
    return message


def _recent(conversation: Conversation, budget: int) -> tuple[list[dict[str, Any]], int]:
    picked: list[dict[str, Any]] = []
    used = 0
    before: int | None = None
    batch = FIRST_BATCH
    base = (
        Message.objects.filter(conversation_id=conversation.id, status__in=REPLAYED_STATUSES)
        .exclude(role=Message.Role.SYSTEM)
        .order_by("-seq")
        .values_list("seq", "role", "content", "tool_calls", "tool_call_id", "tokens")
    )
    while True:
        query = base if before is None else base.filter(seq__lt=before)
        rows = list(query[:batch])
        for seq, role, content, tool_calls, tool_call_id, tokens in rows:
            if role == Message.Role.ASSISTANT and not content and not tool_calls:
                continue
            if used + tokens > budget:
                picked.reverse()
                return picked, used
            picked.append(as_api_message(role, content, tool_calls, tool_call_id))
            used += tokens
            before = seq
        if len(rows) < batch:
            picked.reverse()
            return picked, used
        batch = min(batch * 4, MAX_BATCH)


def prompt_assemble(*, conversation: Conversation, assistant: Assistant, context_window: int) -> Prompt:
    prefix = system_messages(assistant)
    prefix_tokens = sum(count_message(m, assistant.model) for m in prefix)
    budget = (
        context_window
        - assistant.max_tokens
        - prefix_tokens
        - TOKENS_REPLY_PRIMING
        - SAFETY_MARGIN_TOKENS
    )
    history, history_tokens = _recent(conversation, max(budget, 0))
    return Prompt(
        messages=prefix + history,
        tokens=prefix_tokens + history_tokens + TOKENS_REPLY_PRIMING,
        history_messages=len(history),
    )
