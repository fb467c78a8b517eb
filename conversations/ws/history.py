"""History frames on the chat socket: the caller's conversations listed, one read back (newest
messages first), renamed or deleted. Strictly the caller's own: a foreign id is `not_found`,
exactly like a missing one. Each frame is one database hop on the socket's kept connection."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Q, Sum

from billing.models import UsageRecord
from billing.services import money_str
from config.db import database_sync_to_async
from conversations import lifecycle
from conversations.errors import EndUserBlocked
from conversations.gatekeepers import Caller, access_conversation
from conversations.models import Conversation, Message
from conversations.protocol import CLIENT_MSG_ID_MAX, InvalidFrame, _optional_str, _uuid, echo, text_check
from conversations.services import generation_claimed
from tenants.models import EndUser

# Fields each frame may carry besides `type` and `client_msg_id`.
FRAMES = {
    "conversations.list": {"before", "limit"},
    "conversation.read": {"conversation_id", "before", "limit"},
    "conversation.rename": {"conversation_id", "title"},
    "conversation.delete": {"conversation_id"},
}
DEFAULT_LIMITS = {"conversations.list": 20, "conversation.read": 50}
MAX_LIMIT, MAX_TITLE = 100, 200
# A list cursor: the last item's updated_at (microseconds since the epoch) and id, so items
# updated at the same instant are neither skipped nor repeated.
_CURSOR = re.compile(r"^(\d{1,20})\.([0-9a-f]{32})$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The transcript a client shows: tool results ride on the assistant's tool_calls, as live.
_SHOWN_ROLES = (Message.Role.USER, Message.Role.ASSISTANT)
# The ledger rows that make a message's usage, as message.completed counted them (no moderation).
_MESSAGE_KINDS = (UsageRecord.Kind.CHAT, UsageRecord.Kind.CACHED)
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens")


@dataclass(frozen=True)
class HistoryCommand:
    type: str
    conversation_id: uuid.UUID | None = None
    before: Any = None  # conversations.list: (microseconds, id); conversation.read: a seq
    limit: int = 0
    title: str = ""
    client_msg_id: str | None = None


def history_parse(frame: Any) -> HistoryCommand | None:
    """The frame as a history command; None when it is not one. Raises InvalidFrame."""
    kind = frame.get("type") if isinstance(frame, dict) else None
    if not isinstance(kind, str) or kind not in FRAMES:
        return None
    unknown = set(frame) - FRAMES[kind] - {"type", "client_msg_id"}
    if unknown:
        raise InvalidFrame(f"unknown field(s) for {kind}: {', '.join(sorted(unknown))}")
    return HistoryCommand(
        type=kind,
        conversation_id=_uuid(frame.get("conversation_id"), required=True) if kind != "conversations.list" else None,
        before=_before(kind, frame.get("before")),
        limit=_limit(DEFAULT_LIMITS.get(kind, 1) if frame.get("limit") is None else frame["limit"]),
        title=_title(frame.get("title")) if kind == "conversation.rename" else "",
        client_msg_id=_optional_str(frame, "client_msg_id", CLIENT_MSG_ID_MAX),
    )


def _limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise InvalidFrame(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return value


def _before(kind: str, value: Any) -> Any:
    if value is None:
        return None
    if kind == "conversations.list":
        found = _CURSOR.match(value) if isinstance(value, str) else None
        if found is None:
            raise InvalidFrame("before must be a `next` cursor of an earlier conversations frame")
        return _EPOCH + timedelta(microseconds=int(found.group(1))), uuid.UUID(found.group(2))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidFrame("before must be a message seq (a positive integer)")
    return value


def _title(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TITLE:
        raise InvalidFrame(f"title must be a string of at most {MAX_TITLE} characters")
    return text_check(value, "title").strip()


async def history_answer(*, caller: Caller, command: HistoryCommand) -> dict[str, Any]:
    """The server frame answering the command. Raises NotFound, GenerationBusy, EndUserBlocked."""
    answer = await database_sync_to_async(_HANDLERS[command.type])(caller=caller, command=command)
    return {**answer, **echo(command.client_msg_id)}


def conversations_list(*, caller: Caller, command: HistoryCommand) -> dict[str, Any]:
    if EndUser.objects.filter(pk=caller.end_user_id, is_blocked=True).exists():
        raise EndUserBlocked()
    queryset = Conversation.objects.for_tenant(caller.tenant_id).filter(end_user_id=caller.end_user_id)
    if command.before is not None:
        at, last_id = command.before
        queryset = queryset.filter(Q(updated_at__lt=at) | Q(updated_at=at, id__lt=last_id))
    rows = list(queryset.select_related("assistant").order_by("-updated_at", "-id")[: command.limit + 1])
    page, now = rows[: command.limit], datetime.now(UTC)
    items = [
        {"id": str(row.id), "title": row.title, "assistant": row.assistant.slug,
         "updated_at": _time(row.updated_at), "generating": generation_claimed(row, now)}
        for row in page
    ]
    return {"type": "conversations", "items": items, "next": _cursor(page[-1]) if len(rows) > len(page) else None}


def _cursor(conversation: Conversation) -> str:
    return f"{(conversation.updated_at - _EPOCH) // timedelta(microseconds=1)}.{conversation.id.hex}"


def conversation_read(*, caller: Caller, command: HistoryCommand) -> dict[str, Any]:
    conversation = access_conversation(caller=caller, conversation_id=command.conversation_id)
    queryset = Message.objects.for_tenant(caller.tenant_id).filter(conversation=conversation, role__in=_SHOWN_ROLES)
    if command.before is not None:
        queryset = queryset.filter(seq__lt=command.before)
    rows = list(queryset.order_by("-seq")[: command.limit + 1])
    page = rows[: command.limit]
    usage = _usage(conversation, [row.id for row in page if row.role == Message.Role.ASSISTANT])
    return {
        "type": "conversation.messages", "conversation_id": str(conversation.id),
        "messages": [_message(row, usage.get(row.id)) for row in page],
        "next": page[-1].seq if len(rows) > len(page) else None,
    }


def _usage(conversation: Conversation, message_ids: list[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
    """Per message, its ledger rows summed: tokens and cost, as the turn's message.completed said."""
    if not message_ids:
        return {}
    rows = (
        UsageRecord.objects.for_tenant(conversation.tenant_id)
        .filter(conversation_id=conversation.id, message_id__in=message_ids, kind__in=_MESSAGE_KINDS)
        .values("message_id").annotate(cost=Sum("cost_usd"), **{key: Sum(key) for key in _USAGE_KEYS})
    )
    return {
        row["message_id"]: {"usage": {key: row[key] for key in _USAGE_KEYS}, "cost_usd": money_str(row["cost"] or Decimal(0))}
        for row in rows
    }


def _message(message: Message, usage: dict[str, Any] | None) -> dict[str, Any]:
    frame = {
        "id": str(message.id), "seq": message.seq, "role": message.role, "content": message.content,
        "status": message.status, "model": message.model, "created_at": _time(message.created_at),
    }
    if message.tool_calls is not None:
        frame["tool_calls"] = message.tool_calls
    if message.cached:
        frame["cached"] = True
    return {**frame, **(usage or {})}


def conversation_rename(*, caller: Caller, command: HistoryCommand) -> dict[str, Any]:
    conversation = access_conversation(caller=caller, conversation_id=command.conversation_id)
    lifecycle.conversation_rename(conversation=conversation, title=command.title)
    return {"type": "conversation.renamed", "conversation_id": str(conversation.id), "title": command.title}


def conversation_delete(*, caller: Caller, command: HistoryCommand) -> dict[str, Any]:
    conversation = access_conversation(caller=caller, conversation_id=command.conversation_id)
    lifecycle.conversation_delete(tenant_id=caller.tenant_id, conversation_id=conversation.id)
    return {"type": "conversation.deleted", "conversation_id": str(conversation.id)}


def _time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


_HANDLERS = {
    "conversations.list": conversations_list,
    "conversation.read": conversation_read,
    "conversation.rename": conversation_rename,
    "conversation.delete": conversation_delete,
}
