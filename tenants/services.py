"""Writes for tenants: creation, API keys, end users, end-user tokens, provider credentials."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.core import signing
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone as dj_timezone

from .models import ApiKey, EndUser, Membership, ProviderCredential, Tenant

logger = logging.getLogger(__name__)

API_KEY_PREFIX = "pk"
# Channel-layer message every socket of a blocked end user receives (see end_user_group).
END_USER_BLOCKED = "end_user.blocked"
END_USER_TOKEN_SALT = "parley.end-user-token"


class InvalidApiKey(Exception):
    """Unknown, malformed or revoked API key."""


class InvalidEndUserToken(Exception):
    """Forged, expired or malformed end-user token, or a blocked / unknown end user."""


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedApiKey:
    api_key: ApiKey
    plaintext: str  # shown once, never stored


def api_key_create(*, tenant: Tenant, name: str = "default", actor: object = None, actor_label: str = "") -> IssuedApiKey:
    from .audit import audit_record

    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    plaintext = f"{API_KEY_PREFIX}_{prefix}_{secret}"
    with transaction.atomic():
        key = ApiKey.objects.create(tenant=tenant, name=name, prefix=prefix, key_hash=_hash_key(plaintext))
        audit_record(tenant_id=tenant.pk, action="api_key.create", actor=actor, actor_label=actor_label, obj=key)
    return IssuedApiKey(api_key=key, plaintext=plaintext)


def api_keys_revoke(*, keys: Iterable[ApiKey], actor: object = None) -> int:
    """Revoke each key not revoked yet; each revocation is in the audit trail."""
    from .audit import audit_record
    from .freshness import config_changed

    revoked = 0
    now = dj_timezone.now()
    with transaction.atomic():
        for key in keys:
            if ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=now):
                audit_record(tenant_id=key.tenant_id, action="api_key.revoke", actor=actor, obj=key)
                config_changed(key.tenant_id)
                revoked += 1
    return revoked


def api_key_prefix(plaintext: str) -> str:
    """The lookup prefix of a presented key (`pk_<prefix>_<secret>`). Raises InvalidApiKey."""
    parts = plaintext.split("_", 2)
    if len(parts) != 3 or parts[0] != API_KEY_PREFIX or not parts[1]:
        raise InvalidApiKey("malformed API key")
    return parts[1]


def api_key_hash_matches(plaintext: str, key_hash: str) -> bool:
    return hmac.compare_digest(key_hash, _hash_key(plaintext))


def api_key_authenticate(plaintext: str) -> ApiKey:
    """The ApiKey (with its tenant loaded) for a presented key. Raises InvalidApiKey."""
    try:
        key = ApiKey.objects.select_related("tenant").get(prefix=api_key_prefix(plaintext))
    except ApiKey.DoesNotExist:
        raise InvalidApiKey("unknown API key") from None
    if not api_key_hash_matches(plaintext, key.key_hash):
        raise InvalidApiKey("unknown API key")
    if key.revoked_at is not None or not key.tenant.is_active:
        raise InvalidApiKey("revoked API key")
    return key


def end_user_get_or_create(*, tenant_id: int, external_id: str) -> EndUser:
    try:
        end_user, _ = EndUser.objects.get_or_create(tenant_id=tenant_id, external_id=external_id)
    except IntegrityError:  # a concurrent first request created it
        end_user = EndUser.objects.get(tenant_id=tenant_id, external_id=external_id)
    return end_user


@dataclass(frozen=True)
class EndUserToken:
    token: str
    expires_at: datetime


def end_user_token_issue(*, end_user: EndUser, ttl_seconds: int) -> EndUserToken:
    """A signed token naming the tenant and end user, valid for ttl_seconds."""
    if ttl_seconds <= 0:
        raise ValueError("ttl must be positive")
    expires_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=ttl_seconds)
    payload = {"t": end_user.tenant_id, "u": str(end_user.id), "exp": int(expires_at.timestamp())}
    token = signing.dumps(payload, salt=END_USER_TOKEN_SALT, compress=False)
    return EndUserToken(token=token, expires_at=expires_at)


def end_user_token_verify(token: str) -> EndUser:
    """The EndUser a token names. Raises InvalidEndUserToken when forged, expired or blocked."""
    return end_user_token_authenticate(token)[0]


def end_user_token_authenticate(token: str) -> tuple[EndUser, datetime]:
    """The EndUser a token names and when the token expires (a socket holding it closes
    then). Raises InvalidEndUserToken when forged, expired or blocked."""
    try:
        payload = signing.loads(token, salt=END_USER_TOKEN_SALT)
        tenant_id, end_user_id, exp = int(payload["t"]), str(payload["u"]), int(payload["exp"])
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        raise InvalidEndUserToken("invalid token") from None
    if exp <= datetime.now(UTC).timestamp():
        raise InvalidEndUserToken("token expired")
    try:
        end_user = EndUser.objects.select_related("tenant").get(id=end_user_id, tenant_id=tenant_id)
    except EndUser.DoesNotExist:
        raise InvalidEndUserToken("invalid token") from None
    if end_user.is_blocked or not end_user.tenant.is_active:
        raise InvalidEndUserToken("end user is blocked")
    return end_user, datetime.fromtimestamp(exp, UTC)


def end_user_group(*, tenant_id: int, end_user_id: object) -> str:
    """The channel-layer group every open socket of an end user joins, in any web process."""
    return f"t{tenant_id}.u{end_user_id}"


def end_users_block(*, end_users: QuerySet[EndUser], actor: object = None) -> int:
    """Block them: every surface refuses them from now on, and their open sockets, in any web
    process, are told `unauthorized` and closed once the block is committed."""
    from .audit import audit_record
    from .freshness import config_changed

    targets = list(end_users)
    with transaction.atomic():
        blocked = EndUser.objects.filter(pk__in=[u.pk for u in targets], is_blocked=False).update(is_blocked=True)
        for end_user in targets:
            audit_record(tenant_id=end_user.tenant_id, action="end_user.block", actor=actor, obj=end_user)
        for tenant_id in {u.tenant_id for u in targets}:
            config_changed(tenant_id)
        transaction.on_commit(lambda: _sockets_close(targets))
    return blocked


def _sockets_close(end_users: list[EndUser]) -> None:
    layer = get_channel_layer()
    for end_user in end_users:
        try:
            group = end_user_group(tenant_id=end_user.tenant_id, end_user_id=end_user.pk)
            async_to_sync(layer.group_send)(group, {"type": END_USER_BLOCKED})
        except Exception:  # noqa: BLE001 — the block holds regardless: each socket turn re-checks it
            logger.exception("could not close the sockets of end user %s", end_user.pk)


def member_end_user(*, tenant: Tenant, user_id: int) -> EndUser:
    """Tenant members chatting on the built-in page do so as an end user of their own."""
    return end_user_get_or_create(tenant_id=tenant.pk, external_id=f"member:{user_id}")


def member_session_end_user(*, user_id: int, tenant_slug: str = "") -> EndUser | None:
    """The end user a signed-in member chats and reads as (their own, made on first use), in the
    active tenant `tenant_slug` names, else their first; None when they belong to none such.
    The one rule of the socket and of REST reads with the session cookie."""
    memberships = Membership.objects.filter(user_id=user_id, tenant__is_active=True).select_related("tenant")
    if tenant_slug:
        memberships = memberships.filter(tenant__slug=tenant_slug)
    membership = memberships.order_by("id").first()
    return None if membership is None else member_end_user(tenant=membership.tenant, user_id=user_id)


@transaction.atomic
def tenant_create(
    *,
    slug: str,
    name: str = "",
    provider_base_url: str,
    provider_key: str = "",
    owner_email: str | None = None,
    owner_password: str | None = None,
) -> tuple[Tenant, ProviderCredential]:
    tenant = Tenant.objects.create(slug=slug, name=name or slug)
    credential = ProviderCredential.objects.create(
        tenant=tenant, name="default", base_url=provider_base_url, api_key=provider_key
    )
    if owner_email:
        owner_add(tenant=tenant, email=owner_email, password=owner_password or "")
    return tenant, credential


def owner_add(*, tenant: Tenant, email: str, password: str) -> Membership:
    """An owner signs in to the admin with their email as username."""
    User = get_user_model()
    user, created = User.objects.get_or_create(username=email, defaults={"email": email})
    if created or password:
        if not password:
            raise ValueError("a new owner needs a password")
        user.set_password(password)
    user.is_staff = True
    user.save()
    membership, _ = Membership.objects.update_or_create(
        tenant=tenant, user=user, defaults={"role": Membership.Role.OWNER}
    )
    return membership


def end_user_hash(*, tenant_id: int, end_user_id: object) -> str:
    """The `user` sent upstream: stable per end user, meaningless outside Parley."""
    from django.conf import settings

    digest = hmac.new(settings.SECRET_KEY.encode(), f"{tenant_id}:{end_user_id}".encode(), hashlib.sha256)
    return "pu_" + digest.hexdigest()[:32]


def credential_default(*, tenant_id: int) -> ProviderCredential | None:
    return ProviderCredential.objects.for_tenant(tenant_id).order_by("id").first()
