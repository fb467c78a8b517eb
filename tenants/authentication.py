"""API-key authentication (`Authorization: Bearer pk_…`) for DRF views and the /v1 surface."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db.models import Q
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, SessionAuthentication
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request

from observability.context import context_bind

from .models import ApiKey, Tenant
from .services import InvalidApiKey, api_key_authenticate, member_session_end_user

# `last_used_at` is a hint for admins, not an audit log: at most one write a minute per key
# keeps a busy key from turning every request into an UPDATE.
LAST_USED_RESOLUTION = timedelta(minutes=1)


@dataclass(frozen=True)
class ApiKeyPrincipal:
    """`request.user` for an API-key caller: acts for the whole tenant."""

    api_key: ApiKey

    is_authenticated = True
    is_anonymous = False

    @property
    def tenant(self) -> Tenant:
        return self.api_key.tenant

    def __str__(self) -> str:
        return f"api key {self.api_key.prefix} of {self.api_key.tenant.slug}"


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer …` header; None when there is no bearer."""
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def api_key_touch(key: ApiKey) -> None:
    if _stamp(key.pk, last=key.last_used_at):
        key.last_used_at = timezone.now()


_touched: dict[int, datetime] = {}  # key id → when this process last stamped it


def api_key_touch_by_id(key_id: int) -> None:
    """`api_key_touch` for a caller that holds no ApiKey row (the /v1 endpoint, after its
    call): this process's last stamp stands in for the row's."""
    if _stamp(key_id, last=_touched.get(key_id)):
        _touched[key_id] = timezone.now()


def _stamp(key_id: int, *, last: datetime | None) -> bool:
    """Stamp `last_used_at` unless `last` is recent; True when it was due."""
    now = timezone.now()
    if last is not None and now - last < LAST_USED_RESOLUTION:
        return False
    # Conditional: of several processes noticing a stale stamp at once, one writes.
    ApiKey.objects.filter(pk=key_id).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION)
    ).update(last_used_at=now)
    return True


def api_key_from_authorization(authorization: str) -> ApiKey:
    """The live ApiKey (tenant loaded) named by an Authorization header. Raises InvalidApiKey.
    Synchronous ORM: call it from a sync view or inside a database_sync_to_async hop."""
    token = bearer_token(authorization)
    if token is None:
        raise InvalidApiKey("missing bearer API key")
    key = api_key_authenticate(token)
    api_key_touch(key)
    return key


class ApiKeyAuthentication(BaseAuthentication):
    """DRF: a missing, unknown, malformed or revoked key is a 401 (never a 403)."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[ApiKeyPrincipal, ApiKey] | None:
        authorization = request.headers.get("Authorization", "")
        if not authorization:
            return None  # not attempted: IsAuthenticated answers 401
        try:
            key = api_key_from_authorization(authorization)
        except InvalidApiKey as error:
            raise exceptions.AuthenticationFailed(str(error)) from None
        context_bind(tenant_id=key.tenant_id)
        return ApiKeyPrincipal(key), key

    def authenticate_header(self, request: Request) -> str:
        return self.keyword


@dataclass(frozen=True)
class MemberSession:
    """`request.auth` of a signed-in tenant member reading over REST: unlike a key, which acts
    for its whole tenant, it reads only the member's own end user's conversations."""

    tenant_id: int
    end_user_id: uuid.UUID


class MemberSessionAuthentication(SessionAuthentication):
    """DRF: the session cookie of a tenant member, for reads only (GET, HEAD, OPTIONS: the chat
    page restores its transcript; it writes through the socket), so no write rides a cookie a
    browser sends on its own. `?tenant=SLUG` picks the tenant, as on the socket."""

    def authenticate(self, request: Request) -> tuple[object, MemberSession] | None:
        found = super().authenticate(request) if request.method in SAFE_METHODS else None
        if found is None:
            return None
        end_user = member_session_end_user(user_id=found[0].pk, tenant_slug=request.query_params.get("tenant", ""))
        if end_user is None:
            return None
        if end_user.is_blocked:
            raise exceptions.AuthenticationFailed("this end user is blocked")
        return found[0], MemberSession(tenant_id=end_user.tenant_id, end_user_id=end_user.id)


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Describes the scheme in the OpenAPI document (loaded with the authentication class)."""

    target_class = ApiKeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema: object) -> dict[str, str]:
        return {"type": "http", "scheme": "bearer", "description": "A tenant API key, `pk_…`."}


class MemberSessionAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = MemberSessionAuthentication
    name = "memberSession"

    def get_security_definition(self, auto_schema: object) -> dict[str, str]:
        return {
            "type": "apiKey", "in": "cookie", "name": "sessionid",
            "description": "A signed-in tenant member's session: reads of their own conversations only.",
        }
