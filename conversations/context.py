"""Prompt assembly: the byte-stable prefix, then the most recent messages that fit the budget.

The prefix is the system prompt (tool definitions travel beside it, serialised in a fixed
order by `tools/`) and, for the summarise strategy, the conversation's summary: nothing in it
changes between compactions, so provider prompt caching keeps working. History is read
newest-first in growing batches and reading stops as soon as the budget is full, using the
token count stored on each message when it was written: a turn costs O(window), not
O(history). A tool call and its results are kept or dropped together; an orphaned `tool`
message would make the API answer 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llm.tokens import TOKENS_REPLY_PRIMING, count_message, count_tools

from .models import Assistant, Conversation, Message

# Room left for the count's own error (framing differences across models, name fields).
SAFETY_MARGIN_TOKENS = 64
FIRST_BATCH = 64
MAX_BATCH = 4096

# What is replayed to the model: answers that were cut short still carry context; blocked
# and failed messages never go back upstream.
REPLAYED_STATUSES = (Message.Status.COMPLETE, Message.Status.INCOMPLETE)

SUMMARY_PREAMBLE = "Summary of the earlier part of this conversation:\n"


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, Any]]
    tokens: int  # prompt tokens by our count: framing, tools and reply priming included
    history_messages: int  # how many stored messages made it in
    history_tokens: int  # their tokens
    truncated: bool  # older unsummarised messages did not fit


def prefix_messages(assistant: Assistant, conversation: Conversation) -> list[dict[str, Any]]:
    prefix: list[dict[str, Any]] = []
    if assistant.system_prompt:
        prefix.append({"role": "system", "content": assistant.system_prompt})
    if assistant.history_strategy == Assistant.HistoryStrategy.SUMMARIZE and conversation.summary:
        prefix.append({"role": "system", "content": SUMMARY_PREAMBLE + conversation.summary})
    return prefix


def as_api_message(role: str, content: str, tool_calls: Any, tool_call_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": role, "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
        if not content:
            message["content"] = None
    if tool_call_id:
        message["tool_call_id"] = tool_call_id
    return message


class _Window:
    """Collects history newest-first within a token budget, keeping tool groups whole."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.picked: list[dict[str, Any]] = []
        self.used = 0
        self.pending: list[dict[str, Any]] = []  # tool results awaiting their call message
        self.pending_tokens = 0
        self.full = False

    def _take(self, messages: list[dict[str, Any]], tokens: int) -> None:
        if self.used + tokens > self.budget:
            self.full = True
            return
        self.picked.extend(messages)
        self.used += tokens

    def offer(self, row: tuple) -> None:
        role, content, tool_calls, tool_call_id, tokens = row
        message = as_api_message(role, content, tool_calls, tool_call_id)
        if role == Message.Role.TOOL:
            self.pending.append(message)
            self.pending_tokens += tokens
            return
        if self.pending:
            answered = {m["tool_call_id"] for m in self.pending}
            results, results_tokens = self.pending, self.pending_tokens
            self.pending, self.pending_tokens = [], 0
            if role == Message.Role.ASSISTANT and tool_calls and {c["id"] for c in tool_calls} == answered:
                self._take(results + [message], results_tokens + tokens)
                return
            # Results whose call is not right before them are orphans: never sent upstream.
        if role == Message.Role.ASSISTANT and tool_calls:
            return  # a call whose results were never stored (the turn was cut): drop it
        if role == Message.Role.ASSISTANT and not content:
            return
        self._take([message], tokens)

    def messages(self) -> list[dict[str, Any]]:
        return list(reversed(self.picked))


def _recent(
    conversation: Conversation, *, budget: int, after_seq: int, newest: tuple | None = None
) -> tuple[list[dict[str, Any]], int, bool]:
    window = _Window(budget)
    if newest is not None:
        window.offer(newest)
        if window.full:
            return window.messages(), window.used, True
    if conversation._state.adding:  # a turn starting a conversation: it has no history yet
        return window.messages(), window.used, False
    before: int | None = None
    batch = FIRST_BATCH
    base = (
        Message.objects.filter(conversation_id=conversation.id, status__in=REPLAYED_STATUSES, seq__gt=after_seq)
        .exclude(role=Message.Role.SYSTEM)
        .order_by("-seq")
        .values_list("seq", "role", "content", "tool_calls", "tool_call_id", "tokens")
    )
    while True:
        query = base if before is None else base.filter(seq__lt=before)
        rows = list(query[:batch])
        for seq, *row in rows:
            window.offer(tuple(row))
            if window.full:
                return window.messages(), window.used, True
            before = seq
        if len(rows) < batch:
            return window.messages(), window.used, False
        batch = min(batch * 4, MAX_BATCH)


def history_budget(*, assistant: Assistant, context_window: int, fixed_tokens: int) -> int:
    """Tokens left for history: the window minus the reply, the prefix, tools and a margin."""
    budget = context_window - assistant.max_tokens - fixed_tokens - TOKENS_REPLY_PRIMING - SAFETY_MARGIN_TOKENS
    if assistant.history_strategy == Assistant.HistoryStrategy.WINDOW:
        budget = min(budget, assistant.history_window_tokens)
    return max(budget, 0)


def prompt_assemble(
    *,
    conversation: Conversation,
    assistant: Assistant,
    context_window: int,
    tools: list[dict[str, Any]] | None = None,
    newest: Message | None = None,
) -> Prompt:
    """The prompt of the conversation's next call. `newest` is a message not stored yet that
    goes after every stored one (the user's, while the turn is being admitted)."""
    prefix = prefix_messages(assistant, conversation)
    fixed = sum(count_message(m, assistant.model) for m in prefix) + count_tools(tools, assistant.model)
    after_seq = (
        conversation.summary_through_seq
        if assistant.history_strategy == Assistant.HistoryStrategy.SUMMARIZE
        else 0
    )
    budget = history_budget(assistant=assistant, context_window=context_window, fixed_tokens=fixed)
    pending = None
    if newest is not None:
        pending = (newest.role, newest.content, newest.tool_calls, newest.tool_call_id, newest.tokens)
    history, history_tokens, truncated = _recent(conversation, budget=budget, after_seq=after_seq, newest=pending)
    return Prompt(
        messages=prefix + history,
        tokens=fixed + history_tokens + TOKENS_REPLY_PRIMING,
        history_messages=len(history),
        history_tokens=history_tokens,
        truncated=truncated,
    )
