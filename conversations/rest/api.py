"""REST API (DRF) for integrations: conversations, messages, end-user tokens.

Every view authenticates an API key, which acts for its whole tenant; objects are fetched only
through tenant-scoped selectors, so a foreign id answers exactly like a missing one. Posting a
message runs the same engine as the WebSocket, awaited from an async view (api_async.py):
`stream: true` answers `text/event-stream` carrying the WebSocket events, otherwise the view
awaits the reply and returns it, holding no thread meanwhile.
"""

from __future__ import annotations

import uuid
from base64 import b64decode
from typing import Any
from urllib.parse import parse_qsl

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import close_old_connections
from django.http import StreamingHttpResponse
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, status
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response

from config.rest import TenantApi, error_responses
from conversations import gatekeepers, lifecycle, selectors
from conversations.errors import NotFound, TurnFailed
from conversations.gatekeepers import Caller
from conversations.protocol import MessageCreate, text_check
from tenants import ratelimits
from tenants.authentication import ApiKeyAuthentication, MemberSessionAuthentication
from tenants.ratelimits import LimitState

from . import sse
from .api_async import AsyncDispatch
from .serializers import (
    ConversationCreateSerializer,
    ConversationSerializer,
    EndUserTokenRequestSerializer,
    EndUserTokenSerializer,
    MessageCreateSerializer,
    MessageSerializer,
)

# Reads also take a tenant member's session (the chat page restores its transcript): it reads
# its own end user's conversations only. Writes need the key (the session authenticates no write).
READ_AUTHENTICATION = [ApiKeyAuthentication, MemberSessionAuthentication]


# A view under `conversations/{id}/`: the conversation through the tenant's gatekeeper, or the
# end user's for a member's session. (No docstring: drf-spectacular would publish it as every
# operation's description.)
class TenantConversationApi(TenantApi):
    authentication_classes = READ_AUTHENTICATION

    def conversation(self, conversation_id: uuid.UUID) -> Any:
        if self.member_end_user_id is not None:
            caller = Caller(tenant_id=self.tenant_id, end_user_id=self.member_end_user_id)
            return gatekeepers.access_conversation(caller=caller, conversation_id=conversation_id)
        return gatekeepers.access_tenant_conversation(tenant_id=self.tenant_id, conversation_id=conversation_id)


class StrictCursorPagination(CursorPagination):
    """A malformed `page_size` or `cursor` is a 400, not silently the default or DRF's 404:
    a cursor is only what `encode_cursor` writes, with a position its ordering field accepts
    (a crafted one reached the database as a 500)."""

    page_size_query_param = "page_size"
    invalid_cursor = {"cursor": ["not a cursor this API gave out; follow `next` and `previous`"]}

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> Any:
        self.model = queryset.model
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request: Request) -> Cursor | None:
        try:
            cursor = super().decode_cursor(request)
            if cursor is not None:
                self._cursor_check(request.query_params[self.cursor_query_param], cursor)
        except (exceptions.NotFound, DjangoValidationError, ValueError, TypeError):
            raise exceptions.ValidationError(self.invalid_cursor) from None
        return cursor

    def _cursor_check(self, encoded: str, cursor: Cursor) -> None:
        """Raises ValueError or ValidationError for anything DRF would not have written."""
        querystring = b64decode(encoded.encode("ascii"), validate=True).decode("ascii")
        tokens = parse_qsl(querystring, strict_parsing=bool(querystring))
        if not {key for key, _ in tokens} <= {"o", "r", "p"} or len(tokens) != len(dict(tokens)):
            raise ValueError("unknown or repeated cursor fields")
        if cursor.position is not None:
            field = self.model._meta.get_field(self.ordering[0].lstrip("-"))
            text_check(cursor.position, "cursor")
            field.run_validators(field.to_python(cursor.position))

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.getlist(self.page_size_query_param)
        if not raw:
            return self.page_size
        if len(raw) > 1 or not (raw[0].isascii() and raw[0].isdigit()) or not 1 <= int(raw[0]) <= self.max_page_size:
            raise exceptions.ValidationError(
                {self.page_size_query_param: [f"an integer from 1 to {self.max_page_size}"]}
            )
        return int(raw[0])

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": self.max_page_size}
        return parameters


class NewestFirst(StrictCursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50
    max_page_size = 200


class BySeq(StrictCursorPagination):
    ordering = ("seq",)
    page_size = 100
    max_page_size = 500


class BySeqNewestFirst(BySeq):
    ordering = ("-seq",)


MESSAGE_ORDERS = {"oldest": BySeq, "newest": BySeqNewestFirst}


def release_db_connection() -> None:
    """Give the database connection back before a long wait or stream: a connection held per
    open stream would exhaust the server's connections."""
    close_old_connections()


# --- conversations ------------------------------------------------------------------------


class ConversationListApi(TenantApi):
    authentication_classes = READ_AUTHENTICATION
    pagination_class = NewestFirst

    @extend_schema(
        operation_id="conversations_list",
        parameters=[OpenApiParameter("end_user", str, pattern=r"^[^\x00]*$", description="Only this end user's conversations (their external id; no NUL).")],
        responses={200: ConversationSerializer(many=True), **error_responses("invalid_request", "unauthorized", "not_found")},
    )
    def get(self, request: Request) -> Response:
        external_id = request.query_params.get("end_user")
        conversations = selectors.conversation_list(
            tenant_id=self.tenant_id, end_user_id=self.member_end_user_id,
            external_id=None if external_id is None else text_check(external_id, "end_user"),
        )
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(conversations, request, view=self)
        return paginator.get_paginated_response(ConversationSerializer(page, many=True).data)

    @extend_schema(
        operation_id="conversations_create",
        request=ConversationCreateSerializer,
        responses={201: ConversationSerializer, **error_responses("invalid_request", "unauthorized", "not_found")},
    )
    def post(self, request: Request) -> Response:
        body = ConversationCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        conversation = lifecycle.conversation_create(
            tenant=self.api_key.tenant,
            assistant_slug=body.validated_data["assistant"],
            end_user_external_id=body.validated_data["end_user"],
            title=body.validated_data["title"],
        )
        return Response(ConversationSerializer(conversation).data, status=status.HTTP_201_CREATED)


class ConversationDetailApi(TenantConversationApi):
    @extend_schema(
        operation_id="conversations_retrieve",
        responses={200: ConversationSerializer, **error_responses("unauthorized", "not_found")},
    )
    def get(self, request: Request, conversation_id: uuid.UUID) -> Response:
        return Response(ConversationSerializer(self.conversation(conversation_id)).data)

    @extend_schema(
        operation_id="conversations_destroy",
        responses={204: None, **error_responses("invalid_request", "unauthorized", "not_found")},
    )
    def delete(self, request: Request, conversation_id: uuid.UUID) -> Response:
        lifecycle.conversation_delete(tenant_id=self.tenant_id, conversation_id=conversation_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- messages -----------------------------------------------------------------------------

SSE_DESCRIPTION = (
    "With `stream: true`: `text/event-stream`. Each `data:` line carries one WebSocket event, "
    "in order: `message.accepted`, `message.started`, `delta`…, then `message.completed` or "
    "`error`; the stream ends with `data: [DONE]`. Lines starting with `:` are keep-alives."
)
SSE_EXAMPLE = (
    'data: {"type":"message.accepted","message_id":"…"}\n\n'
    'data: {"type":"message.started","message_id":"…","model":"gpt-4o-mini"}\n\n'
    'data: {"type":"delta","message_id":"…","content":"Hel"}\n\n'
    'data: {"type":"message.completed","message_id":"…","finish_reason":"stop",'
    '"usage":{"prompt_tokens":20,"completion_tokens":25,"cached_tokens":0},"cost_usd":"0.000036"}\n\n'
    "data: [DONE]\n\n"
)

# One server-sent event, as SSE clients (and schemathesis) parse it.
SSE_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "data": {
            "type": "string",
            "description": (
                "One WebSocket event as JSON (`message.accepted`, `message.started`, `delta`, "
                "`tool.call`, `tool.result`, `message.completed`, `error`), or `[DONE]` last."
            ),
        },
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}


class MessageListApi(AsyncDispatch, TenantConversationApi):
    pagination_class = BySeq

    @extend_schema(
        operation_id="messages_list",
        parameters=[OpenApiParameter("order", str, enum=list(MESSAGE_ORDERS), default="oldest", description="By `seq`: `oldest` first, or `newest` first (a transcript read back from its end).")],
        responses={200: MessageSerializer(many=True), **error_responses("invalid_request", "unauthorized", "not_found")},
    )
    def get(self, request: Request, conversation_id: uuid.UUID) -> Response:
        order = request.query_params.get("order", "oldest")
        if order not in MESSAGE_ORDERS:
            raise exceptions.ValidationError({"order": ["`oldest` or `newest`"]})
        conversation = self.conversation(conversation_id)
        paginator = MESSAGE_ORDERS[order]()
        page = paginator.paginate_queryset(selectors.message_list(conversation=conversation), request, view=self)
        return paginator.get_paginated_response(MessageSerializer(page, many=True).data)

    @extend_schema(
        operation_id="messages_create",
        request=MessageCreateSerializer,
        responses={
            (201, "application/json"): OpenApiResponse(
                MessageSerializer, description="`stream: false`: the assistant's reply, once complete."
            ),
            (200, "text/event-stream"): OpenApiResponse(
                SSE_EVENT_SCHEMA,
                description=SSE_DESCRIPTION,
                examples=[OpenApiExample("a turn", value=SSE_EXAMPLE, media_type="text/event-stream")],
            ),
            **error_responses(
                "invalid_request", "unauthorized", "not_found", "cancelled", "rate_limited",
                "spending_cap_exceeded", "upstream_error", "upstream_timeout",
            ),
        },
    )
    async def post(self, request: Request, conversation_id: uuid.UUID) -> Response | StreamingHttpResponse:
        # Async end to end: the turn is awaited on the event loop; only the database legs hop.
        body = MessageCreateSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        conversation = await sync_to_async(self._conversation_released)(conversation_id)
        # A tenant's key talks for the conversation's own end user: limits, caps and the
        # gatekeeper inside the engine all see that end user.
        caller = Caller(tenant_id=self.tenant_id, end_user_id=conversation.end_user_id, api_key_id=self.api_key.pk)
        command = MessageCreate(
            content=body.validated_data["content"],
            conversation_id=conversation.id,
            client_msg_id=body.validated_data["client_msg_id"],
        )
        # Admission (limits, caps) happens inside turn_submit before any upstream call, raising
        # the domain errors mapped above; settlement when the engine finishes the turn.
        if body.validated_data["stream"]:
            listener = await sse.turn_listen(caller=caller, command=command)
            return ratelimit_headers(sse.event_stream_response(listener), listener.plan.limit_states)
        plan, terminal = await sse.turn_wait(caller=caller, command=command)
        if terminal.get("type") != "message.completed" and not terminal.get("log_lost"):
            raise TurnFailed(terminal)
        reply = await sync_to_async(self._reply)(conversation, plan.assistant_message_id, terminal)
        return ratelimit_headers(Response(reply, status=status.HTTP_201_CREATED), plan.limit_states)

    def _conversation_released(self, conversation_id: uuid.UUID) -> Any:
        conversation = self.conversation(conversation_id)
        release_db_connection()  # this request's thread holds no connection through the turn
        return conversation

    def _reply(self, conversation: Any, message_id: uuid.UUID, terminal: dict[str, Any]) -> dict[str, Any]:
        try:
            return MessageSerializer(selectors.message_get(conversation=conversation, message_id=message_id)).data
        except NotFound:  # the log lost the turn's events and nothing was stored
            raise TurnFailed(terminal) from None


def ratelimit_headers(response: Any, states: tuple[LimitState, ...]) -> Any:
    """OpenAI-style `x-ratelimit-*` headers for the limits that applied."""
    for name, value in ratelimits.ratelimit_headers(states):
        response[name] = value
    return response


# --- end users ----------------------------------------------------------------------------


class EndUserTokenApi(TenantApi):
    @extend_schema(
        operation_id="end_user_token_create",
        parameters=[OpenApiParameter("external_id", str, OpenApiParameter.PATH, description="The tenant's own id for the end user; created on first use.")],
        request=EndUserTokenRequestSerializer,
        responses={200: EndUserTokenSerializer, **error_responses("invalid_request", "unauthorized")},
    )
    def post(self, request: Request, external_id: str) -> Response:
        if not external_id or len(external_id) > 200:
            raise NotFound("end user")
        text_check(external_id, "external_id")
        body = EndUserTokenRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        ttl = body.validated_data.get("ttl", settings.END_USER_TOKEN_DEFAULT_TTL)
        issued = lifecycle.end_user_token_mint(tenant_id=self.api_key.tenant_id, external_id=external_id, ttl_seconds=ttl)
        return Response(EndUserTokenSerializer({"token": issued.token, "expires_at": issued.expires_at}).data)
