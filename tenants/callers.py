"""Who a call is for: the one caller type of every surface, the caps and the rate limits."""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """A tenant, and — when known — one of its end users and the API key that speaks for them.

    Sockets know a tenant and an end user; REST and `/v1` add their key; a summary or a
    moderation call for the tenant alone knows only the tenant. What the caller may do (limits,
    caps, policy, price) is configuration, cached apart (`conversations.admission`)."""

    tenant_id: int
    end_user_id: uuid.UUID | None = None
    api_key_id: int | None = None
