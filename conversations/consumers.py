"""WebSocket consumer at /ws/chat/: translates frames to engine calls and group events to frames."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from typing import Any

from channels.db import aclose_old_connections, database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from tenants.services import end_user_group

from . import engine
from .errors import ChatError, EndUserBlocked
from .protocol import (
    DOMAIN_ERRORS,
    ConversationJoin,
    ErrorEvent,
    GenerationCancel,
    InvalidFrame,
    MessageCreate,
    echo,
    error_event_for,
    frame_client_msg_id,
    json_parse,
    parse_client_frame,
    text_client_msg_id,
)
from .services import Caller
from .sockets import socket_authenticate

# A generation that does not answer a state request in this long is gone (its process died
# or it just finished); the joiner then gets the stored state.
STATE_REPLY_TIMEOUT = 2.0


class ChatConsumer(AsyncJsonWebsocketConsumer):
    caller: Caller | None = None  # None: not (or no longer) authorized; frames are ignored
    expires_at: datetime | None = None  # the token's expiry; None for a session
    _expiry: asyncio.TimerHandle | None = None
    refused = False

    async def connect(self) -> None:
        self.groups_joined: set[str] = set()
        # conversation id -> timer: deltas of a joined generation are dropped until its state
        # (which already contains them) arrives.
        self.awaiting_state: dict[str, asyncio.TimerHandle] = {}
        authenticated = await database_sync_to_async(socket_authenticate)(self.scope)
        await self.accept()
        if authenticated is None:
            return await self._refuse("invalid or expired credentials")
        self.caller, self.expires_at = authenticated
        # A block reaches every socket of the end user, in any web process, through this group.
        group = end_user_group(tenant_id=self.caller.tenant_id, end_user_id=self.caller.end_user_id)
        await self.channel_layer.group_add(group, self.channel_name)
        self.groups_joined.add(group)
        self._expire_later()

    def _expire_later(self) -> None:
        """Close the socket when its token expires; the client reconnects with a fresh one."""
        if self.expires_at is None:
            return
        delay = max(0.0, self.expires_at.timestamp() - time.time())
        self._expiry = asyncio.get_running_loop().call_later(
            delay, lambda: asyncio.ensure_future(self._refuse("token expired"))
        )

    def _expired(self) -> bool:
        return self.expires_at is not None and self.expires_at.timestamp() <= time.time()

    async def _refuse(self, message: str, **extra: Any) -> None:
        """The credentials are bad or went bad: say so and close, as a refused connect does."""
        if self.refused:
            return
        self.refused, self.caller = True, None
        if self._expiry is not None:
            self._expiry.cancel()
        await self.send_json(ErrorEvent(code="unauthorized", message=message, extra=extra).as_dict())
        await self.close(code=4401)

    async def disconnect(self, code: int) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
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
            return await self._send_error(
                ErrorEvent.invalid_request("frame too large", client_msg_id=text_client_msg_id(text_data))
            )
        try:
            frame = json_parse(text_data)
        except InvalidFrame as error:
            return await self._send_error(
                ErrorEvent.invalid_request(f"the frame is not usable: {error}", client_msg_id=text_client_msg_id(text_data))
            )
        await self.receive_json(frame)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        assert self.caller is not None
        # Every error answering this frame carries its client_msg_id back, so the client can
        # match it to the message it shows as pending.
        extra = echo(frame_client_msg_id(content))
        if self._expired():  # each frame, in case the close at expiry has not happened yet
            return await self._refuse("token expired", **extra)
        try:
            command = parse_client_frame(content)
        except InvalidFrame as error:
            return await self._send_error(error_event_for(error, **extra))
        await aclose_old_connections()
        try:
            await self._dispatch(command)
        except EndUserBlocked as error:  # blocked since the socket opened
            await self._refuse(error.message, **extra)
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

    async def end_user_blocked(self, message: dict[str, Any]) -> None:
        await self._refuse("this end user is blocked")

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
