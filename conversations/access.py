"""What an OpenAI-compatible call knows of its caller, kept in process memory between calls.

A streamed `/v1` call must reach the provider with as little as possible in front of it. What
it needs of the database — the API key and its tenant, the tenant's limits, default credential,
caps and content policy, the end user, the model's price — changes rarely, so each web process keeps it, keyed
by what the call presents, and trusts it only while the tenant's configuration version (see
`tenants.freshness`) is the one it was read under. The version arrives in the same Redis round
trip that counts the rate limits, so a warm call reads nothing from the database before the
provider: the caps' conditional UPDATEs are its only statements.

Loading happens on the endpoint's database threads (synchronous ORM); the versions are read
before the rows, so a change committed meanwhile can only make the cache look older than it is.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from cachetools import LRUCache

from billing.caps import Subject, caps_applicable
from billing.models import ModelPrice, SpendingCap
from billing.services import Price, PriceMissing, price_for
from llm.gateway import ProviderTarget
from moderation.rules import PolicySnapshot
from moderation.services import policy_for
from tenants.freshness import MAX_AGE_SECONDS, versions_read
from tenants.models import ApiKey, EndUser
from tenants.ratelimits import Caller
from tenants.services import InvalidApiKey, api_key_hash_matches, end_user_get_or_create

from .errors import ChatError, EndUserBlocked, NotFound  # noqa: F401  (EndUserBlocked: re-exported for /v1)
from .models import Assistant
from .providers import provider_target


class ModelNotAvailable(ChatError):
    """A model without a price, or outside the key's allowed list (OpenAI: 404)."""

    code = "not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")
        self.model = model


@dataclass(frozen=True)
class KeyAccess:
    """An API key as a /v1 call needs it, with its tenant's configuration."""

    prefix: str
    key_id: int
    key_hash: str = field(repr=False)
    tenant_id: int
    live: bool  # not revoked, tenant active
    allowed_models: frozenset[str]
    key_rpm: int | None
    end_user_rpm: int
    tenant_rpm: int
    tenant_tpm: int
    target: ProviderTarget | None
    default_max_tokens: int
    defaults_error: ChatError | None  # no default assistant or credential: raised at use
    caps: tuple[SpendingCap, ...]
    moderation: PolicySnapshot | None  # the tenant's content policy; None: nothing is checked
    versions: tuple[int, int]
    loaded_at: float

    def authenticate(self, token: str) -> None:
        """Raises InvalidApiKey unless `token` is this live key."""
        if not api_key_hash_matches(token, self.key_hash):
            raise InvalidApiKey("unknown API key")
        if not self.live:
            raise InvalidApiKey("revoked API key")

    def model_check(self, model: str) -> None:
        if self.allowed_models and model not in self.allowed_models:
            raise ModelNotAvailable(model)

    def defaults(self) -> tuple[ProviderTarget, int]:
        if self.defaults_error is not None:
            raise self.defaults_error
        assert self.target is not None
        return self.target, self.default_max_tokens

    def limits(self, end_user_id: uuid.UUID) -> Caller:
        return Caller(
            tenant_id=self.tenant_id, end_user_rpm=self.end_user_rpm, tenant_rpm=self.tenant_rpm,
            tenant_tpm=self.tenant_tpm, end_user_id=end_user_id, api_key_id=self.key_id, api_key_rpm=self.key_rpm,
        )

    def caps_for(self, end_user_id: uuid.UUID) -> list[tuple[SpendingCap, str]]:
        return caps_applicable(self.caps, Subject(self.tenant_id, end_user_id, self.key_id))


@dataclass(frozen=True)
class EndUserAccess:
    id: uuid.UUID
    is_blocked: bool
    version: int  # the tenant's


@dataclass(frozen=True)
class PriceAccess:
    price: Price | None  # None: no chat price for the model
    version: int  # everyone's


_lock = threading.Lock()
_keys: LRUCache = LRUCache(maxsize=10_000)  # prefix → KeyAccess
_end_users: LRUCache = LRUCache(maxsize=100_000)  # (tenant id, external id) → EndUserAccess
_prices: LRUCache = LRUCache(maxsize=1_000)  # model → PriceAccess; bounded: callers name any model


def access_caches_clear() -> None:
    with _lock:
        _keys.clear()
        _end_users.clear()
        _prices.clear()


# --- reading the caches (event loop) ------------------------------------------------------


def cached_key(prefix: str) -> KeyAccess | None:
    with _lock:
        access = _keys.get(prefix)
    if access is None or time.monotonic() - access.loaded_at > MAX_AGE_SECONDS:
        return None
    return access


def cached_end_user(access: KeyAccess, external_id: str) -> EndUserAccess | None:
    with _lock:
        end_user = _end_users.get((access.tenant_id, external_id))
    return end_user if end_user is not None and end_user.version == access.versions[0] else None


def cached_price(access: KeyAccess, model: str) -> Price | None | bool:
    """The model's chat price; None when it has none; False when not known here (load it)."""
    with _lock:
        known = _prices.get(model)
    if known is None or known.version != access.versions[1]:
        return False
    return known.price


# --- loading (database threads) -----------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    access: KeyAccess
    end_user: EndUserAccess
    price: Price | None


def access_load(*, prefix: str, token: str, external_id: str, model: str) -> Loaded:
    """Read the key, its tenant's configuration, the end user and the price afresh, cache
    them, and return them. Raises InvalidApiKey for an unknown prefix or a wrong secret —
    before the end user is looked up, so a caller without the key creates nothing."""
    tenant_id = ApiKey.objects.filter(prefix=prefix).values_list("tenant_id", flat=True).first()
    if tenant_id is None:
        raise InvalidApiKey("unknown API key")
    versions = versions_read(tenant_id)  # before the rows: see the module's docstring
    access = _key_load(prefix, versions)
    access.authenticate(token)
    end_user = end_user_load(access=access, external_id=external_id)
    price = price_load(access=access, model=model)
    return Loaded(access=access, end_user=end_user, price=price)


def _key_load(prefix: str, versions: tuple[int, int]) -> KeyAccess:
    key = ApiKey.objects.select_related("tenant").get(prefix=prefix)
    tenant = key.tenant
    target, max_tokens, error = None, 0, None
    try:
        assistant = Assistant.objects.for_tenant(tenant.pk).select_related("credential").get(is_default=True)
        target, max_tokens = provider_target(assistant), assistant.max_tokens
    except Assistant.DoesNotExist:
        error = NotFound("assistant")
    except ChatError as failure:  # no credential
        error = failure
    access = KeyAccess(
        prefix=prefix, key_id=key.pk, key_hash=key.key_hash, tenant_id=tenant.pk,
        live=key.revoked_at is None and tenant.is_active,
        allowed_models=frozenset(key.allowed_models or ()), key_rpm=key.rpm,
        end_user_rpm=tenant.end_user_rpm, tenant_rpm=tenant.tenant_rpm, tenant_tpm=tenant.tenant_tpm,
        target=target, default_max_tokens=max_tokens, defaults_error=error,
        caps=tuple(SpendingCap.objects.for_tenant(tenant.pk).order_by("id")),
        moderation=policy_for(tenant_id=tenant.pk),
        versions=versions, loaded_at=time.monotonic(),
    )
    with _lock:
        _keys[prefix] = access
    return access


def end_user_load(*, access: KeyAccess, external_id: str) -> EndUserAccess:
    row: EndUser = end_user_get_or_create(tenant_id=access.tenant_id, external_id=external_id)
    end_user = EndUserAccess(id=row.id, is_blocked=row.is_blocked, version=access.versions[0])
    with _lock:
        _end_users[(access.tenant_id, external_id)] = end_user
    return end_user


def price_load(*, access: KeyAccess, model: str) -> Price | None:
    try:
        price: Price | None = price_for(model, kind=ModelPrice.Kind.CHAT)
    except PriceMissing:
        price = None
    with _lock:
        _prices[model] = PriceAccess(price=price, version=access.versions[1])
    return price
