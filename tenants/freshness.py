"""Configuration versions: how per-process caches of tenant configuration stay honest.

Hot paths (the OpenAI-compatible endpoint) keep what they read of a tenant's configuration —
its API keys, end users, caps, credential, default assistant, and the prices — in process
memory. Every write to that configuration replaces the tenant's *version*: a random token in
Redis in services mode (shared by every web process), in process memory when embedded. A
reader keeps the version it saw when it loaded, compares it with the current one — read in the
same Redis round trip as the rate limits, so the check costs no extra trip — and reloads on any
difference. Random tokens, not counters: a Redis that restarts empty cannot bring an old
version back.

Writes through the ORM are seen by signals (`connect`); the few queryset `.update()` calls on
these models call `config_changed` themselves. The version changes twice: at once (a reader that
reloads before the commit reads the old rows under the new token, and is corrected by) the
second change after the commit. Readers also reload after `MAX_AGE_SECONDS`, which bounds what a
write made behind Django's back (raw SQL, a restored backup) can leave stale.
"""

from __future__ import annotations

import logging
import uuid
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete, post_save

logger = logging.getLogger(__name__)

MAX_AGE_SECONDS = 60.0
EVERY_TENANT = "all"  # the version of what all tenants share: prices, the encryption keys
_local: dict[str, str] = {}  # embedded mode: one process, one dict


def version_key(scope: int | str) -> str:
    return f"parley:cfg:{scope}"


def version_keys(tenant_id: int) -> tuple[str, str]:
    """The two versions a tenant's cached configuration depends on: its own and everyone's."""
    return version_key(tenant_id), version_key(EVERY_TENANT)


@lru_cache(maxsize=1)
def _redis() -> Any:
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=5, socket_connect_timeout=5)


def versions_read(tenant_id: int) -> tuple[str, str]:
    keys = version_keys(tenant_id)
    if not settings.REDIS_URL:
        return tuple(_local.get(key, "") for key in keys)  # type: ignore[return-value]
    values = _redis().mget(keys)
    return tuple(value.decode() if value else "" for value in values)  # type: ignore[return-value]


def local_versions(keys: tuple[str, ...]) -> tuple[str, ...]:
    """Embedded mode's versions (services mode reads them from Redis, in a pipeline)."""
    return tuple(_local.get(key, "") for key in keys)


def _replace(scope: int | str) -> None:
    key = version_key(scope)
    token = uuid.uuid4().hex
    if not settings.REDIS_URL:
        _local[key] = token
        return
    try:
        _redis().set(key, token)
    except Exception:  # noqa: BLE001 — a missed bump is healed by MAX_AGE_SECONDS; say so
        logger.exception("could not publish a configuration change of %s", scope)


def config_changed(tenant_id: int | None) -> None:
    """The tenant's configuration (None: what every tenant shares) changed: caches reload."""
    scope: int | str = EVERY_TENANT if tenant_id is None else tenant_id
    _replace(scope)
    transaction.on_commit(lambda: _replace(scope))


# --- signals ------------------------------------------------------------------------------

# model label → how to find the tenant of an instance (None: every tenant)
_WATCHED: dict[str, str | None] = {
    "tenants.Tenant": "pk",
    "tenants.ApiKey": "tenant_id",
    "tenants.EndUser": "tenant_id",
    "tenants.ProviderCredential": "tenant_id",
    "conversations.Assistant": "tenant_id",
    "billing.SpendingCap": "tenant_id",
    "moderation.ModerationPolicy": "tenant_id",
    "billing.ModelPrice": None,
}


# A new row of these is in no cache yet (caches hold rows they have read), so only its changes
# and deletion matter; a new cap, assistant, credential or price changes what others resolve to.
_NEW_ROWS_CHANGE_NOTHING = {"tenants.Tenant", "tenants.ApiKey", "tenants.EndUser"}


def _changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    label = sender._meta.label
    if kwargs.get("created") and label in _NEW_ROWS_CHANGE_NOTHING:
        return
    if kwargs.get("update_fields") == frozenset({"last_used_at"}):
        return  # an API key's last-use stamp is not configuration
    attribute = _WATCHED[label]
    config_changed(None if attribute is None else getattr(instance, attribute))


def connect() -> None:
    from django.apps import apps

    for label in _WATCHED:
        model = apps.get_model(label)
        post_save.connect(_changed, sender=model, dispatch_uid=f"freshness-save-{label}")
        post_delete.connect(_changed, sender=model, dispatch_uid=f"freshness-delete-{label}")
