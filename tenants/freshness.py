"""Configuration versions: how per-process caches of tenant configuration stay honest.

Hot paths (the OpenAI-compatible endpoint) keep what they read of a tenant's configuration —
its API keys, end users, caps, credential, default assistant, content policy, and the prices — in process
memory. Every write to that configuration replaces the tenant's *version*: a random number in
Django's cache — Redis in services mode, shared by every web process; process memory when
embedded. A reader keeps the version it saw when it loaded, compares it with the current one —
read in the same Redis round trip as the rate limits, so the check costs no extra trip — and
reloads on any difference. Random numbers, not counters: a Redis that restarts empty cannot
bring an old version back.

Writes through the ORM are seen by signals on the models each app registers in its
`AppConfig.ready()` (`watch`); the few queryset `.update()` calls on
these models call `config_changed` themselves. The version changes twice, at once and again
after the commit: a reader that reloads in between reads the old rows under the first new
version, and the second sends it back for the committed ones. Readers also reload after
`MAX_AGE_SECONDS`, which bounds what a write made behind Django's back (raw SQL, a restored
backup) can leave stale.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

from django.core.cache import cache
from django.db import transaction
from django.db.models import Model
from django.db.models.signals import post_delete, post_save

logger = logging.getLogger(__name__)

MAX_AGE_SECONDS = 60.0
EVERY_TENANT = "all"  # the version of what all tenants share: prices


def version_key(scope: int | str) -> str:
    return f"cfg:{scope}"


def version_keys(tenant_id: int) -> tuple[str, str]:
    """The two versions a tenant's cached configuration depends on: its own and everyone's."""
    return version_key(tenant_id), version_key(EVERY_TENANT)


def versions_read(tenant_id: int) -> tuple[int, int]:
    """The tenant's current versions (0: never changed, or forgotten by a restarted Redis)."""
    keys = version_keys(tenant_id)
    found = cache.get_many(keys)
    return int(found.get(keys[0], 0)), int(found.get(keys[1], 0))


def versions_stored_keys(tenant_id: int) -> tuple[str, ...]:
    """The keys `versions_read` reads, as the cache stores them (its prefix and key version
    applied), for a caller that reads them in a Redis pipeline of its own."""
    return tuple(cache.make_key(key) for key in version_keys(tenant_id))


def versions_parse(stored: tuple[str, ...]) -> tuple[int, int]:
    """Versions read raw from Redis: the cache stores an int as its decimal digits."""
    first, second = (int(value) if value else 0 for value in stored)
    return first, second


def _replace(scope: int | str) -> None:
    try:  # an int, which the Redis cache stores unpickled: a pipeline can read it raw
        cache.set(version_key(scope), secrets.randbits(62) + 1, timeout=None)
    except Exception:  # noqa: BLE001 — a missed change is healed by MAX_AGE_SECONDS; say so
        logger.exception("could not publish a configuration change of %s", scope)


def config_changed(tenant_id: int | None) -> None:
    """The tenant's configuration (None: what every tenant shares) changed: caches reload."""
    scope: int | str = EVERY_TENANT if tenant_id is None else tenant_id
    _replace(scope)
    transaction.on_commit(lambda: _replace(scope))


# --- signals ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Watch:
    tenant_attribute: str | None  # how to find the tenant of an instance (None: every tenant)
    new_rows_change_nothing: bool


# Each app registers its own models in its AppConfig.ready(), so this module names none of the
# apps above it. By model label.
_watched: dict[str, _Watch] = {}


def watch(model: type[Model], *, tenant: str | None = "tenant_id", new_rows_change_nothing: bool = False) -> None:
    """Saves and deletes of `model` change the configuration of the instance's tenant (found
    by the attribute `tenant`; None: every tenant's). `new_rows_change_nothing`: a new row is in
    no cache yet (caches hold rows they have read), so only its changes and deletion matter —
    unlike a new cap, assistant, credential or price, which changes what others resolve to."""
    label = model._meta.label
    _watched[label] = _Watch(tenant, new_rows_change_nothing)
    post_save.connect(_changed, sender=model, dispatch_uid=f"freshness-save-{label}")
    post_delete.connect(_changed, sender=model, dispatch_uid=f"freshness-delete-{label}")


def watched() -> dict[str, str | None]:
    """Model label → tenant attribute, for every watched model (tests, docs)."""
    return {label: watch.tenant_attribute for label, watch in _watched.items()}


def _changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    watch = _watched[sender._meta.label]
    if kwargs.get("created") and watch.new_rows_change_nothing:
        return
    if kwargs.get("update_fields") == frozenset({"last_used_at"}):
        return  # an API key's last-use stamp is not configuration
    attribute = watch.tenant_attribute
    config_changed(None if attribute is None else getattr(instance, attribute))
