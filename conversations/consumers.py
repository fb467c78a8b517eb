"""WebSocket consumer at /ws/chat/: translates frames to engine calls, and each joined
conversation's event log to frames (a reader task per conversation, each frame with its offset)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any
from urllib.parse import parse_qs

from channels.db import aclose_old_connections, database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from tenants.models import Membership
from tenants.services import InvalidEndUserToken, end_user_token_verify, member_end_user

from . import engine
from .errors import ChatError
from .protocol import (
    DOMAIN_ERRORS,
    ConversationJoin,
    ErrorEvent,
    GenerationCancel,
    InvalidFrame,
    MessageCreate,
    error_event_for,
    parse_client_frame,
)
from .services import Caller


def _authenticate(scope: dict[str, Any]) -> Caller | None:
    """An end-user token in the query string, or the session of a tenant member."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    token = (query.get("token") or [""])[0]
    if token:
        try:
            end_user = end_user_token_verify(token)
        except InvalidEndUserToken:
            return None
        return Caller(tenant_id=end_user.tenant_id, end_user_id=end_user.id)
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        return None
    memberships = Membership.objects.filter(user=user, tenant__is_active=True).select_related("tenant")
    wanted = (query.get("tenant") or [""])[0]
    if wanted:
        memberships = memberships.filter(tenant__slug=wanted)
    membership = memberships.order_by("id").first()
    if membership is None:
        return None
    end_user = member_end_user(tenant=membership.tenant, user_id=user.pk)
    if end_user.is_blocked:
        return None
    return Caller(tenant_id=membership.tenant_id, end_user_id=end_user.id)


class ChatConsumer(AsyncJsonWebsocketConsumer):
    caller: Caller | None = None

    async def connect(self) -> None:
        # conversation id -> the task forwarding its event log to this socket.
        self.readers: dict[uuid.UUID, asyncio.Task[None]] = {}
        self.caller = await database_sync_to_async(_authenticate)(self.scope)
        await self.accept()
        if self.caller is None:
            await self.send_json(ErrorEvent(code="unauthorized", message="invalid or expired credentials").as_dict())
            await self.close(code=4401)

    async def disconnect(self, code: int) -> None:
        # The generation keeps running; only this socket stops reading.
        for reader in self.readers.values():
            reader.cancel()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        if self.caller is None:
            return
        if text_data is None:
            return await self._send_error(ErrorEvent.invalid_request("frames must be JSON text"))
        if len(text_data) > settings.MAX_MESSAGE_CHARS * 2 + 4096:
            return await self._send_error(ErrorEvent.invalid_request("frame too large"))
        try:
            frame = json.loads(text_data)
        except ValueError:
            return await self._send_error(ErrorEvent.invalid_request("frames must be valid JSON"))
        await self.receive_json(frame)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        assert self.caller is not None
        try:
            command = parse_client_frame(content)
        except InvalidFrame as error:
            return await self._send_error(ErrorEvent.invalid_request(str(error)))
        await aclose_old_connections()
        extra = {}
        if isinstance(command, MessageCreate) and command.client_msg_id:
            extra["client_msg_id"] = command.client_msg_id
        try:
            await self._dispatch(command)
        except DOMAIN_ERRORS as error:
            await self._send_error(error_event_for(error, **extra))

    async def _dispatch(self, command: MessageCreate | GenerationCancel | ConversationJoin) -> None:
        assert self.caller is not None
        if isinstance(command, MessageCreate):
            turn = await engine.turn_submit(caller=self.caller, command=command)
            if turn.plan.conversation_id not in self.readers:  # a joined one already forwards it
                self._follow(turn.plan.conversation_id, turn.key, turn.after)
        elif isinstance(command, GenerationCancel):
            if not await engine.generation_cancel(caller=self.caller, conversation_id=command.conversation_id):
                raise ChatError("nothing is being generated in this conversation")
        else:
            await self._join(command)

    async def _join(self, command: ConversationJoin) -> None:
        assert self.caller is not None
        # A join restarts this conversation's reading at the joined position: stop the old
        # reader first, so the state frame follows every event it sent and nothing is sent twice.
        previous = self.readers.pop(command.conversation_id, None)
        if previous is not None:
            previous.cancel()
            await asyncio.wait([previous])
        joined = await engine.conversation_join(
            caller=self.caller, conversation_id=command.conversation_id, after=command.after
        )
        await self.send_json({**joined.state.as_dict(), "offset": joined.offset})
        self._follow(command.conversation_id, joined.key, joined.after)

    def _follow(self, conversation_id: uuid.UUID, key: str, after: str) -> None:
        self.readers[conversation_id] = asyncio.create_task(self._forward(key, after), name=f"socket reader {key}")

    async def _forward(self, key: str, after: str) -> None:
        async for offset, event in engine.events_follow(key, after):
            await self.send_json({**event, "offset": offset})

    async def _send_error(self, event: ErrorEvent) -> None:
        await self.send_json(event.as_dict())
