"""Consecutive deltas of one message as one: for a reader that is behind, and for a generation
whose appends queued while the log's round trip was out.

The protocol lets a delta carry several tokens. Nothing ever waits to merge: only what is
already queued (a page a reader has not sent yet, a generation's events not yet appended) is
merged, so a reader or a generation that keeps up still sends one delta per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .eventlog import Entry

# A merged delta's content at most: a reader far behind gets a few large frames, not one huge one.
MAX_CHARS = 4096


def _mergeable(first: dict[str, Any], event: dict[str, Any]) -> bool:
    return event.get("type") == "delta" and event.get("message_id") == first.get("message_id")


def deltas_merge(events: Sequence[dict[str, Any]], start: int = 0) -> tuple[dict[str, Any], int]:
    """The event at `start`, with the deltas of its message right after it merged into it when
    it is a delta, and the index after the last event it stands for."""
    first, end = events[start], start + 1
    if first.get("type") != "delta":
        return first, end
    parts, size = [first["content"]], len(first["content"])
    while end < len(events) and _mergeable(first, events[end]) and size + len(events[end]["content"]) <= MAX_CHARS:
        parts.append(events[end]["content"])
        size += len(parts[-1])
        end += 1
    return (first if len(parts) == 1 else {**first, "content": "".join(parts)}), end


def entries_coalesce(entries: Sequence[Entry]) -> list[Entry]:
    """A page of log entries with each run of deltas of one message as one entry at the run's
    LAST offset: a client resuming after it gets exactly what follows what it was given."""
    events = [event for _, event in entries]
    merged: list[Entry] = []
    start = 0
    while start < len(entries):
        event, end = deltas_merge(events, start)
        merged.append((entries[end - 1][0], event))
        start = end
    return merged
