"""Who may hold a chat socket: its credentials (an end-user token or a member's session) and its origin."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import ParseResult, parse_qs, urlparse

from channels.security.websocket import OriginValidator, WebsocketDenier
from django.conf import settings

from config.db import database_sync_to_async
from conversations.errors import EndUserBlocked
from conversations.gatekeepers import Caller, end_user_admit
from tenants.origins import token_allowed_origins
from tenants.services import InvalidEndUserToken, end_user_token_authenticate, member_session_end_user


def socket_token(scope: dict[str, Any]) -> str:
    """The end-user token of the socket's query string; "" when it has none (a session socket)."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return (query.get("token") or [""])[0]


# --- origins ------------------------------------------------------------------------------


def operator_origins() -> list[str]:
    """The operator's own hosts, as Channels' AllowedHostsOriginValidator reads them."""
    if settings.DEBUG and not settings.ALLOWED_HOSTS:
        return ["localhost", "127.0.0.1", "[::1]"]
    return list(settings.ALLOWED_HOSTS)


def socket_origin_allowed(scope: dict[str, Any], tenant_origins: list[str] | None = None) -> bool:
    """`origin_allowed` for a socket's scope."""
    return origin_allowed(_origin(scope), token=bool(socket_token(scope)), tenant_origins=tenant_origins)


def origin_allowed(origin: ParseResult | None, *, token: bool, tenant_origins: list[str] | None = None) -> bool:
    """The cross-site hijacking guard. A session (cookie) socket must come from the operator's
    hosts: a browser sends the cookie to any page's socket. A token socket carries its own
    credentials, so no `Origin` (apps, servers, scripts) is fine; with one, it must be the
    operator's or one of `tenant_origins`, its tenant's (the websites embedding the widget)."""
    if origin is None:
        return token
    allowed = operator_origins() + ((tenant_origins or []) if token else [])
    # Channels' matching (schemes, ports, `.example.com` subdomains, `*`), on our list.
    try:
        return OriginValidator(None, allowed).valid_origin(origin)
    except ValueError:  # an unreadable port or host: matches nothing
        return False


class SocketOriginValidator:
    """ASGI middleware: sockets whose origin is not allowed are denied before the handshake."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        allowed = socket_origin_allowed(scope)
        if not allowed and socket_token(scope) and _origin(scope) is not None:  # perhaps the tenant's site
            origins = await database_sync_to_async(token_allowed_origins)(socket_token(scope))
            allowed = socket_origin_allowed(scope, origins)
        if allowed:
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)


def _origin(scope: dict[str, Any]) -> ParseResult | None:
    for name, value in scope.get("headers", []):
        if name == b"origin":
            return origin_parse(value.decode("latin-1"))
    return None


def origin_parse(value: str) -> ParseResult:
    try:
        return urlparse(value)
    except ValueError:
        return urlparse("null")  # present but unreadable: matches no allowed origin


# --- credentials --------------------------------------------------------------------------


def socket_authenticate(scope: dict[str, Any]) -> tuple[Caller, datetime | None] | None:
    """The caller and when its credentials expire (None: a session, which has no fixed end);
    None when the credentials are bad. Synchronous ORM: call it through database_sync_to_async."""
    token = socket_token(scope)
    if token:
        try:
            end_user, expires_at = end_user_token_authenticate(token)
        except InvalidEndUserToken:
            return None
        return Caller(tenant_id=end_user.tenant_id, end_user_id=end_user.id), expires_at
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        return None
    wanted = (parse_qs(scope.get("query_string", b"").decode("latin-1")).get("tenant") or [""])[0]
    member = member_session_end_user(user_id=user.pk, tenant_slug=wanted)
    if member is None:
        return None
    try:
        end_user = end_user_admit(member)
    except EndUserBlocked:
        return None
    return Caller(tenant_id=end_user.tenant_id, end_user_id=end_user.id), None
