"""The simulator's counters, read by tests over ``/sim/stats`` or ``app.stats``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol


@dataclass
class SimStats:
    requests: int = 0
    completions: int = 0
    incomplete: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    tool_calls: int = 0
    moderations: int = 0
    embeddings: int = 0
    rate_limited: int = 0  # calls refused by an enforced rate limit (Simulator.rate_limit)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class StatsOwner(Protocol):
    """What a reply books into: the app, whose ``stats`` a ``reset`` replaces mid-stream."""

    stats: SimStats
