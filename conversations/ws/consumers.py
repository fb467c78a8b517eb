"""WebSocket consumer at /ws/chat/: translates frames to engine calls, and each joined
conversation's event log to frames (a reader task per conversation, each frame with its offset)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import datetime
from typing import Any

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from config.db import connection_ready, database_sync_to_async
from conversations import engine
from conversations.errors import ChatError, EndUserBlocked
from conversations.gatekeepers import Caller
from conversations.protocol import (
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
from streaming.outages import UNAVAILABLE
from tenants.services import end_user_group

from .history import HistoryCommand, history_answer, history_parse
from .sockets import socket_authenticate

# The close code for "a dependency is away; reconnect after retry_after": 4000 + HTTP's 503,
# as 4401 is 4000 + 401 (Daphne allows only 1000 and 3000-4999, not RFC 6455's 1013).
TRY_AGAIN_LATER = 4503


class ChatConsumer(AsyncJsonWebsocketConsumer):
    caller: Caller | None = None  # None: not (or no longer) authorized; frames are ignored
    expires_at: datetime | None = None  # the token's expiry; None for a session
    _expiry: asyncio.TimerHandle | None = None
    refused = False

    async def connect(self) -> None:
        self.groups_joined: set[str] = set()  # control messages only (a block)
        # conversation id -> the task forwarding its event log to this socket.
        self.readers: dict[uuid.UUID, asyncio.Task[None]] = {}
        # Accepted first: every outcome, a refusal or an outage too, is told in a frame.
        await self.accept()
        try:
            authenticated = await database_sync_to_async(socket_authenticate)(self.scope)
            if authenticated is None:
                return await self._refuse("invalid or expired credentials")
            # A block reaches every socket of the end user, in any web process, through this group.
            caller, expires_at = authenticated
            group = end_user_group(tenant_id=caller.tenant_id, end_user_id=caller.end_user_id)
            await self.channel_layer.group_add(group, self.channel_name)
        except UNAVAILABLE as error:
            return await self._unavailable(error)
        self.caller, self.expires_at = caller, expires_at
        self.groups_joined.add(group)
        self._expire_later()

    async def _unavailable(self, error: Exception) -> None:
        """PostgreSQL or Redis is down while the socket opens: without them it can neither
        authenticate nor be reached by a block. Say so (an error frame with retry_after) and
        close with 4503, "try again later"; a reconnect after retry_after opens normally."""
        await self.send_json(error_event_for(error).as_dict())
        await self.close(code=TRY_AGAIN_LATER)

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
        # The generation keeps running; only this socket stops reading.
        for reader in self.readers.values():
            reader.cancel()
        for group in self.groups_joined:
            # Redis away: the membership expires with the group (channels_redis group_expiry).
            with contextlib.suppress(*UNAVAILABLE):
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
            command = history_parse(content) or parse_client_frame(content)
        except InvalidFrame as error:
            return await self._send_error(error_event_for(error, **extra))
        await connection_ready()
        try:
            await self._dispatch(command)
        except EndUserBlocked as error:  # blocked since the socket opened
            await self._refuse(error.message, **extra)
        except DOMAIN_ERRORS as error:
            await self._send_error(error_event_for(error, **extra))

    async def _dispatch(self, command: MessageCreate | GenerationCancel | ConversationJoin | HistoryCommand) -> None:
        assert self.caller is not None
        if isinstance(command, HistoryCommand):
            await self.send_json(await history_answer(caller=self.caller, command=command))
            if command.type == "conversation.delete" and command.conversation_id in self.readers:
                self.readers.pop(command.conversation_id).cancel()  # its log ends with it
        elif isinstance(command, MessageCreate):
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

    # --- channel-layer handlers -----------------------------------------------------------

    async def end_user_blocked(self, message: dict[str, Any]) -> None:
        await self._refuse("this end user is blocked")
