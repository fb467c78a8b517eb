"""WebSocket consumer at /ws/chat/: translates frames to engine calls and group events to frames."""

from __future__ import annotations

import asyncio
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
    json_parse,
    parse_client_frame,
)
from .services import Caller

# A generation that does not answer a state request in this long is gone (its process died
# or it just finished); the joiner then gets the stored state.
STATE_REPLY_TIMEOUT = 2.0


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
        self.groups_joined: set[str] = set()
        # conversation id -> timer: deltas of a joined generation are dropped until its state
        # (which already contains them) arrives.
        self.awaiting_state: dict[str, asyncio.TimerHandle] = {}
        self.caller = await database_sync_to_async(_authenticate)(self.scope)
        await self.accept()
        if self.caller is None:
            await self.send_json(ErrorEvent(code="unauthorized", message="invalid or expired credentials").as_dict())
            await self.close(code=4401)

    async def disconnect(self, code: int) -> None:
        for timer in self.awaiting_state.values():
            timer.cancel()
        # The generation keeps running; only this socket stops listening.
        for group in self.groups_joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs: Any) -> None:
        if self.caller is None:
            return
        if text_data is None:
            return await self._send_error(ErrorEvent.invalid_request("frames must be JSON text"))
        if len(text_data) > settings.MAX_MESSAGE_CHARS * 2 + 4096:
            return await self._send_error(ErrorEvent.invalid_request("frame too large"))
        try:
            frame = json_parse(text_data)
        except InvalidFrame as error:
            return await self._send_error(ErrorEvent.invalid_request(f"the frame is not usable: {error}"))
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
            plan = await engine.turn_submit(caller=self.caller, command=command, subscriber=self.channel_name)
            self.groups_joined.add(plan.group)
        elif isinstance(command, GenerationCancel):
            if not await engine.generation_cancel(caller=self.caller, conversation_id=command.conversation_id):
                raise ChatError("nothing is being generated in this conversation")
        else:
            await self._join(command.conversation_id)

    async def _join(self, conversation_id: uuid.UUID) -> None:
        assert self.caller is not None
        group, generating = await engine.conversation_join(
            caller=self.caller, conversation_id=conversation_id, subscriber=self.channel_name
        )
        self.groups_joined.add(group)
        key = str(conversation_id)
        if not generating:
            await self.send_json(engine.idle_state(conversation_id).as_dict())
            return
        loop = asyncio.get_running_loop()
        previous = self.awaiting_state.pop(key, None)
        if previous:
            previous.cancel()
        self.awaiting_state[key] = loop.call_later(
            STATE_REPLY_TIMEOUT, lambda: asyncio.ensure_future(self._state_timeout(key))
        )

    async def _state_timeout(self, key: str) -> None:
        if self.awaiting_state.pop(key, None) is not None:
            await self.send_json(engine.idle_state(uuid.UUID(key)).as_dict())

    async def _send_error(self, event: ErrorEvent) -> None:
        await self.send_json(event.as_dict())

    # --- channel-layer handlers -----------------------------------------------------------

    async def chat_event(self, message: dict[str, Any]) -> None:
        event = message["event"]
        if event.get("type") == "delta" and message.get("conversation_id") in self.awaiting_state:
            return
        await self.send_json(event)

    async def chat_state(self, message: dict[str, Any]) -> None:
        event = message["event"]
        timer = self.awaiting_state.pop(event.get("conversation_id"), None)
        if timer is None:
            return  # answered by the timeout already
        timer.cancel()
        await self.send_json(event)
