"""Chat services: the caller, and a conversation's generation claim (the gatekeepers are in
gatekeepers.py and re-exported here).

The turn itself is in turns.py (admission: the user's message committed, the worst case held,
the conversation claimed) and answers.py (storing and billing what the model answered).
Everything here is synchronous ORM code; the async engine reaches it through
`database_sync_to_async`.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from .gatekeepers import Caller, access_assistant, access_conversation, end_user_admit  # noqa: F401  (re-exported)
from .models import Conversation


def group_name(*, tenant_id: int, conversation_id: uuid.UUID | str) -> str:
    return f"t{tenant_id}.c{conversation_id}"


# --- the generation claim -----------------------------------------------------------------


def generation_stale_before(now) -> Any:
    return now - timedelta(seconds=settings.GENERATION_STALE_SECONDS)


def stale_claim(now) -> Q:
    """A claim whose heartbeat stopped; claims from before heartbeats go by their start."""
    cutoff = generation_stale_before(now)
    return Q(generation_beat_at__lt=cutoff) | Q(generation_beat_at__isnull=True, generation_started_at__lt=cutoff)


def generation_claimed(conversation: Conversation, now) -> bool:
    """A claim whose heartbeat is older than GENERATION_STALE_SECONDS belongs to a process
    that died (the sweep in recovery.py stores its answer)."""
    if conversation.generation_id is None:
        return False
    beat = conversation.generation_beat_at or conversation.generation_started_at
    return beat is not None and beat >= generation_stale_before(now)


def generation_release(*, conversation_id: uuid.UUID, generation_id: uuid.UUID, last_seq: int | None = None) -> None:
    # Conditional on our own claim: a stale claim taken over by another process stays theirs.
    fields: dict[str, Any] = {
        "generation_id": None, "generation_channel": "", "generation_started_at": None, "generation_beat_at": None,
        "updated_at": timezone.now(),
    }
    if last_seq is not None:
        fields["last_seq"] = last_seq
    Conversation.objects.filter(pk=conversation_id, generation_id=generation_id).update(**fields)


def generations_beat(*, generation_ids: list[uuid.UUID]) -> int:
    """Refresh the heartbeat of running generations (one UPDATE for all of a process's);
    how many claims are still theirs (a generation id is claimed by one conversation at most)."""
    return Conversation.objects.filter(generation_id__in=generation_ids).update(generation_beat_at=timezone.now())


def conversation_generation(*, caller: Caller, conversation_id: Any) -> tuple[Conversation, str | None]:
    """The conversation (through the gatekeeper) and the control channel of its running
    generation, if one is running and not stale."""
    conversation = access_conversation(caller=caller, conversation_id=conversation_id)
    return conversation, _control_channel(conversation)


def generation_running(*, conversation_id: uuid.UUID, generation_id: uuid.UUID) -> bool:
    """Whether the generation still holds its conversation's claim."""
    return Conversation.objects.filter(pk=conversation_id, generation_id=generation_id).exists()


def stale_generations(*, conversation_id: uuid.UUID | None = None) -> list[tuple[int, uuid.UUID, uuid.UUID]]:
    """(tenant id, conversation id, generation id) of every claim whose heartbeat stopped."""
    queryset = Conversation.objects.filter(generation_id__isnull=False).filter(stale_claim(timezone.now()))
    if conversation_id is not None:
        queryset = queryset.filter(pk=conversation_id)
    return list(queryset.values_list("tenant_id", "id", "generation_id"))


def _control_channel(conversation: Conversation) -> str | None:
    if not generation_claimed(conversation, timezone.now()) or not conversation.generation_channel:
        return None
    return conversation.generation_channel

