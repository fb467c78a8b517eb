"""Admission: what a call knows of its caller's configuration, kept in process memory between calls.

Every surface admits a call the same way: sockets and REST (a chat turn, `turns.py`) and the
OpenAI-compatible `/v1` proxy (`compat/`). What admission needs of the database — the tenant's
limits, caps, content policy and default assistant, the API key, the end user, the assistant
and its provider target, the model's price — changes rarely, so each web process keeps it and
trusts it only while the tenant's configuration version (`tenants.freshness`) is the one it
was read under. The version arrives in the same Redis round trip that counts the rate limits
(`tenants.ratelimits`), and a call whose version moved is judged again on fresh rows; so a warm
call reads no configuration from the database, and a change (a blocked end user, a revoked key,
a new cap, price, policy or assistant) applies to the very next call in every process.

Loading happens on database threads (synchronous ORM); the versions are read before the rows,
so a change committed meanwhile can only make the cache look older than it is.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from cachetools import LRUCache

from billing.caps import caps_applicable
from billing.models import ModelPrice, SpendingCap
from billing.services import Price, PriceMissing, price_for
from llm.gateway import ProviderTarget
from moderation.rules import PolicySnapshot
from moderation.services import policy_for
from tenants.callers import Caller
from tenants.freshness import MAX_AGE_SECONDS, versions_read
from tenants.models import ApiKey, EndUser, Tenant
from tenants.ratelimits import Limits
from tenants.services import InvalidApiKey, api_key_hash_matches, end_user_get_or_create

from .errors import ChatError, EndUserBlocked, NotFound
from .models import Assistant
from .providers import provider_target


class ModelNotAvailable(ChatError):
    """A model without a price, or outside the key's allowed list (OpenAI: 404)."""

    code = "not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")
        self.model = model


@dataclass(frozen=True)
class AssistantConfig:
    """An assistant with where its calls go (its credential, decrypted once per load)."""

    assistant: Assistant
    target: ProviderTarget | None
    error: ChatError | None  # no credential: raised at use

    def checked(self) -> tuple[Assistant, ProviderTarget]:
        if self.error is not None:
            raise self.error
        assert self.target is not None
        return self.assistant, self.target


@dataclass(frozen=True)
class TenantConfig:
    """A tenant's configuration as admission needs it, and the versions it was read under."""

    tenant_id: int
    active: bool
    limits: Limits  # no key's limit: see `KeyConfig.limits`, `TurnConfig.limits`
    caps: tuple[SpendingCap, ...]
    moderation: PolicySnapshot | None  # the tenant's content policy; None: nothing is checked
    default: AssistantConfig | None  # None: the tenant has no default assistant
    versions: tuple[int, int]  # the tenant's, everyone's (prices)
    loaded_at: float

    def defaults(self) -> tuple[ProviderTarget, int]:
        """The default assistant's target and output bound (`/v1`). Raises NotFound, InvalidInput."""
        if self.default is None:
            raise NotFound("assistant")
        assistant, target = self.default.checked()
        return target, assistant.max_tokens

    def caps_for(self, caller: Caller) -> list[tuple[SpendingCap, str]]:
        return caps_applicable(self.caps, caller)


@dataclass(frozen=True)
class KeyConfig:
    """An API key as a `/v1` call needs it, with its tenant's configuration."""

    prefix: str
    key_id: int
    key_hash: str = field(repr=False)
    revoked: bool
    allowed_models: frozenset[str]
    rpm: int | None
    tenant: TenantConfig
    response_cache: bool = False  # opted in to exact caching of whole /v1 requests

    @property
    def tenant_id(self) -> int:
        return self.tenant.tenant_id

    @property
    def versions(self) -> tuple[int, int]:
        return self.tenant.versions

    @property
    def moderation(self) -> PolicySnapshot | None:
        return self.tenant.moderation

    @property
    def limits(self) -> Limits:
        return Limits(**{**self.tenant.limits.__dict__, "api_key_rpm": self.rpm})

    def caller(self, end_user_id: uuid.UUID) -> Caller:
        return Caller(self.tenant_id, end_user_id, self.key_id)

    def authenticate(self, token: str) -> None:
        """Raises InvalidApiKey unless `token` is this live key."""
        if not api_key_hash_matches(token, self.key_hash):
            raise InvalidApiKey("unknown API key")
        if self.revoked or not self.tenant.active:
            raise InvalidApiKey("revoked API key")

    def model_check(self, model: str) -> None:
        if self.allowed_models and model not in self.allowed_models:
            raise ModelNotAvailable(model)

    def defaults(self) -> tuple[ProviderTarget, int]:
        return self.tenant.defaults()


@dataclass(frozen=True)
class EndUserAccess:
    id: uuid.UUID
    is_blocked: bool


# --- the caches ---------------------------------------------------------------------------

_lock = threading.Lock()
_tenants: LRUCache = LRUCache(maxsize=10_000)  # tenant id → TenantConfig
_keys: LRUCache = LRUCache(maxsize=10_000)  # prefix → KeyConfig
# Rows of a tenant (or everyone's), each stored with the version it was read under:
# ("u", tenant, external id) / ("uid", tenant, id) → EndUserAccess; ("a", tenant, slug | None) /
# ("aid", tenant, id) → AssistantConfig; ("k", tenant, key id) → its rpm.
_rows: LRUCache = LRUCache(maxsize=200_000)
# (tenant, model) → Price, under both versions (a tenant's price overrides the global one).
# Only priced models are kept: callers name any model, and an unpriced one is read each time.
_prices: LRUCache = LRUCache(maxsize=20_000)
_MISSING = object()


def admission_caches_clear() -> None:
    with _lock:
        _tenants.clear()
        _keys.clear()
        _rows.clear()
        _prices.clear()


def _young(loaded_at: float) -> bool:
    return time.monotonic() - loaded_at <= MAX_AGE_SECONDS


def _row(key: Any, version: int, cache: LRUCache = _rows) -> Any:
    with _lock:
        found = cache.get(key)
    return found[1] if found is not None and found[0] == version else _MISSING


def _row_store(key: Any, version: int, value: Any, cache: LRUCache = _rows) -> Any:
    with _lock:
        cache[key] = (version, value)
    return value


def cached_key(prefix: str) -> KeyConfig | None:
    with _lock:
        key = _keys.get(prefix)
    return key if key is not None and _young(key.tenant.loaded_at) else None


def cached_tenant(tenant_id: int) -> TenantConfig | None:
    with _lock:
        tenant = _tenants.get(tenant_id)
    return tenant if tenant is not None and _young(tenant.loaded_at) else None


def cached_end_user(access: KeyConfig, external_id: str) -> EndUserAccess | None:
    found = _row(("u", access.tenant_id, external_id), access.versions[0])
    return None if found is _MISSING else found


def cached_price(access: KeyConfig | TenantConfig, model: str) -> Price | bool:
    """The model's chat price; False when not known here (load it). A model found unpriced is
    read again each time: a refusal must not outlive the price that a tenant just added (the
    versions are only compared after admission has judged the model)."""
    found = _row((access.tenant_id, model), access.versions, _prices)
    return False if found is _MISSING else found


# --- loading (database threads) -----------------------------------------------------------


def tenant_load(tenant_id: int) -> TenantConfig:
    """Read the tenant's configuration afresh and cache it."""
    versions = versions_read(tenant_id)  # before the rows: see the module's docstring
    tenant = Tenant.objects.only("is_active", "end_user_rpm", "tenant_rpm", "tenant_tpm").get(pk=tenant_id)
    default = None
    try:
        assistant = Assistant.objects.for_tenant(tenant_id).select_related("credential").get(is_default=True)
        default = _assistant_config(assistant)
    except Assistant.DoesNotExist:
        pass
    config = TenantConfig(
        tenant_id=tenant_id, active=tenant.is_active,
        limits=Limits(end_user_rpm=tenant.end_user_rpm, tenant_rpm=tenant.tenant_rpm, tenant_tpm=tenant.tenant_tpm),
        caps=tuple(SpendingCap.objects.for_tenant(tenant_id).order_by("id")),
        moderation=policy_for(tenant_id=tenant_id), default=default, versions=versions, loaded_at=time.monotonic(),
    )
    with _lock:
        _tenants[tenant_id] = config
    if default is not None:
        _assistant_store(("a", tenant_id, None), versions[0], default)
    return config


def _assistant_config(assistant: Assistant) -> AssistantConfig:
    try:
        return AssistantConfig(assistant=assistant, target=provider_target(assistant), error=None)
    except ChatError as failure:  # no credential
        return AssistantConfig(assistant=assistant, target=None, error=failure)


@dataclass(frozen=True)
class Loaded:
    access: KeyConfig
    end_user: EndUserAccess
    price: Price | None


def access_load(*, prefix: str, token: str, external_id: str, model: str) -> Loaded:
    """Read the key, its tenant's configuration, the end user and the price afresh, cache
    them, and return them. Raises InvalidApiKey for an unknown prefix or a wrong secret —
    before the end user is looked up, so a caller without the key creates nothing."""
    key = ApiKey.objects.filter(prefix=prefix).only("tenant_id").first()
    if key is None:
        raise InvalidApiKey("unknown API key")
    tenant = tenant_load(key.tenant_id)  # the versions first, then the rows
    key = ApiKey.objects.get(prefix=prefix)
    access = KeyConfig(
        prefix=prefix, key_id=key.pk, key_hash=key.key_hash, revoked=key.revoked_at is not None,
        allowed_models=frozenset(key.allowed_models or ()), rpm=key.rpm, tenant=tenant,
        response_cache=key.response_cache,
    )
    with _lock:
        _keys[prefix] = access
    access.authenticate(token)
    end_user = end_user_load(access=access, external_id=external_id)
    price = price_load(access=access, model=model)
    return Loaded(access=access, end_user=end_user, price=price)


def end_user_load(*, access: KeyConfig, external_id: str) -> EndUserAccess:
    row: EndUser = end_user_get_or_create(tenant_id=access.tenant_id, external_id=external_id)
    return _row_store(("u", access.tenant_id, external_id), access.versions[0], EndUserAccess(row.id, row.is_blocked))


def price_load(*, access: KeyConfig | TenantConfig, model: str) -> Price | None:
    try:
        price = price_for(model, kind=ModelPrice.Kind.CHAT, tenant_id=access.tenant_id)
    except PriceMissing:
        return None
    return _row_store((access.tenant_id, model), access.versions, price, _prices)


# --- a chat turn (sockets and REST) -------------------------------------------------------


@dataclass(frozen=True)
class TurnConfig:
    """What a chat turn is admitted on: its caller's configuration, its assistant and price."""

    caller: Caller
    tenant: TenantConfig
    assistant: Assistant
    target: ProviderTarget
    price: Price
    limits: Limits

    @property
    def caps(self) -> list[tuple[SpendingCap, str]]:
        return self.tenant.caps_for(self.caller)


def turn_config(
    *, caller: Caller, assistant_id: int | None = None, assistant_slug: str | None = None,
    end_user_check: bool = True, reload: bool = False,
) -> TurnConfig:
    """The turn's configuration from this process's cache, loading what it lacks (`reload`:
    the tenant's version moved; read it all again). The assistant by id (a conversation's) or
    by slug (None: the default). Raises EndUserBlocked, NotFound, InvalidInput, PriceMissing."""
    tenant = None if reload else cached_tenant(caller.tenant_id)
    tenant = tenant or tenant_load(caller.tenant_id)
    version = tenant.versions[0]
    if end_user_check and _end_user_blocked(caller, version):
        raise EndUserBlocked()
    key = ("aid", caller.tenant_id, assistant_id) if assistant_id is not None else ("a", caller.tenant_id, assistant_slug)
    config = _row(key, version)
    if config is _MISSING:
        config = _assistant_store(key, version, _assistant_load(caller.tenant_id, assistant_id, assistant_slug))
    assistant, target = config.checked()
    price = price_get(tenant, assistant.model)
    if price is None:
        raise PriceMissing(assistant.model)
    limits = Limits(**{**tenant.limits.__dict__, "api_key_rpm": _key_rpm(caller, version)})
    return TurnConfig(caller=caller, tenant=tenant, assistant=assistant, target=target, price=price, limits=limits)


def price_get(tenant: TenantConfig, model: str) -> Price | None:
    """The model's chat price from this process's cache, loaded when not known here."""
    price = cached_price(tenant, model)
    return price_load(access=tenant, model=model) if price is False else price


def _end_user_blocked(caller: Caller, version: int) -> bool:
    key = ("uid", caller.tenant_id, caller.end_user_id)
    blocked = _row(key, version)
    if blocked is _MISSING:
        row = EndUser.objects.only("is_blocked").get(pk=caller.end_user_id, tenant_id=caller.tenant_id)
        blocked = _row_store(key, version, row.is_blocked)
    return blocked


def _assistant_store(key: tuple, version: int, config: AssistantConfig) -> AssistantConfig:
    """Cached under how it was asked for and under its id (a conversation names it by id)."""
    _row_store(("aid", config.assistant.tenant_id, config.assistant.pk), version, config)
    return _row_store(key, version, config)


def _assistant_load(tenant_id: int, assistant_id: int | None, slug: str | None) -> AssistantConfig:
    queryset = Assistant.objects.for_tenant(tenant_id).select_related("credential")
    try:
        if assistant_id is not None:
            return _assistant_config(queryset.get(pk=assistant_id))
        return _assistant_config(queryset.get(is_default=True) if slug is None else queryset.get(slug=slug))
    except Assistant.DoesNotExist:
        raise NotFound("assistant") from None


def _key_rpm(caller: Caller, version: int) -> int | None:
    if caller.api_key_id is None:
        return None
    key = ("k", caller.tenant_id, caller.api_key_id)
    rpm = _row(key, version)
    if rpm is _MISSING:
        rpm = _row_store(key, version, ApiKey.objects.filter(pk=caller.api_key_id).values_list("rpm", flat=True).first())
    return rpm
