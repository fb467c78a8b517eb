"""The stateless OpenAI-compatible call: who may use which model, what goes upstream, what is billed.

Nothing of the conversation is stored: the caller's messages are the prompt, and the only
write is the UsageRecord of the call. Everything before the upstream call happens in one
synchronous function (`completion_prepare`: four indexed queries, one thread hop from the async
view) and everything after it in another (`completion_settle`), so the path to the first token
stays short.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from cachetools import TTLCache, cached
from django.db import transaction

from billing import ratelimits
from billing.caps import Subject, cap_reserve, cap_settle
from billing.models import ModelPrice, Reservation, UsageRecord
from billing.services import Price, PriceMissing, UsageInput, price_for, usage_record
from llm.gateway import ProviderTarget, Usage
from llm.tokens import count_messages, count_text
from tenants.authentication import api_key_from_authorization
from tenants.models import ApiKey, EndUser
from tenants.services import end_user_get_or_create, end_user_hash

from .errors import ChatError, InvalidInput, NotFound
from .lifecycle import DEFAULT_END_USER
from .models import Assistant
from .services import provider_target, worst_case_cost

MAX_USER_CHARS = 200


class ModelNotAvailable(ChatError):
    """A model without a price, or outside the key's allowed list (OpenAI: 404)."""

    code = "not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.")
        self.model = model


class InvalidRequest(InvalidInput):
    """A malformed request body; `param` names the offending field, as OpenAI does."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EndUserBlocked(ChatError):
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("this end user is blocked")


# --- the request --------------------------------------------------------------------------


def _positive_int(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidRequest(f"'{name}' must be a positive integer", param=name)


def completion_request_parse(raw: bytes) -> dict[str, Any]:
    """The request body, checked only as far as we rely on it; the provider checks the rest
    (roles, tools, response_format…) and its 400 reaches the caller. Raises InvalidRequest."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest("'model' is required", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise InvalidRequest("'messages' must be a non-empty array of message objects", param="messages")
    if not isinstance(body.get("stream", False), bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream")
    if not isinstance(body.get("stream_options") or {}, dict):
        raise InvalidRequest("'stream_options' must be an object", param="stream_options")
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or not user or len(user) > MAX_USER_CHARS):
        raise InvalidRequest(f"'user' must be a non-empty string of at most {MAX_USER_CHARS} characters", param="user")
    return body


# --- before the call ----------------------------------------------------------------------


@dataclass(frozen=True)
class CompletionPlan:
    call_id: str
    tenant_id: int
    api_key_id: int
    end_user_id: uuid.UUID
    model: str
    price: Price
    target: ProviderTarget
    upstream_body: bytes
    messages: list[dict[str, Any]]
    stream: bool
    forward_usage: bool  # the caller asked for stream_options.include_usage
    reservation: Reservation | None = None


# Configuration read on every /v1 call is kept per process for a few seconds: an edited price,
# credential or default assistant applies within CONFIG_TTL_SECONDS. Caps, limits and keys are
# never cached: they are read or counted on every call.
CONFIG_TTL_SECONDS = 15
_prices: TTLCache = TTLCache(maxsize=256, ttl=CONFIG_TTL_SECONDS)
_defaults: TTLCache = TTLCache(maxsize=4096, ttl=CONFIG_TTL_SECONDS)


@dataclass(frozen=True)
class TenantDefaults:
    target: ProviderTarget
    max_tokens: int


def _model_price(key: ApiKey, model: str) -> Price:
    if key.allowed_models and model not in key.allowed_models:
        raise ModelNotAvailable(model)
    try:
        return _cached_price(model)
    except PriceMissing:
        raise ModelNotAvailable(model) from None


def config_caches_clear() -> None:
    _prices.clear()
    _defaults.clear()


@cached(_prices, lock=threading.Lock())
def _cached_price(model: str) -> Price:
    return price_for(model)


@cached(_defaults, lock=threading.Lock())
def _tenant_defaults(tenant_id: int) -> TenantDefaults:
    """The tenant's default assistant's credential and `max_tokens`: what a stateless call
    uses. One query, then kept briefly."""
    try:
        assistant = Assistant.objects.for_tenant(tenant_id).select_related("credential").get(is_default=True)
    except Assistant.DoesNotExist:
        raise NotFound("assistant") from None
    return TenantDefaults(target=provider_target(assistant), max_tokens=assistant.max_tokens)


def upstream_body(request: dict[str, Any], *, user_hash: str, default_max_tokens: int) -> bytes:
    """The caller's request with what we always send: a hashed `user`, a `max_tokens`, and,
    when streaming, `stream_options.include_usage` (usage is how the call is billed)."""
    body = dict(request)
    body["user"] = user_hash
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = default_max_tokens
    if body.get("stream"):
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


def completion_prepare(*, authorization: str, request: dict[str, Any]) -> CompletionPlan:
    """Authenticate, check the model, pick the tenant's credential and the end user. Raises
    InvalidApiKey, ModelNotAvailable, EndUserBlocked, InvalidInput (no credential)."""
    key = api_key_from_authorization(authorization)
    model = request["model"]
    price = _model_price(key, model)
    defaults = _tenant_defaults(key.tenant_id)
    target = defaults.target
    end_user = end_user_get_or_create(tenant=key.tenant, external_id=request.get("user") or DEFAULT_END_USER)
    if end_user.is_blocked:
        raise EndUserBlocked()
    stream = bool(request.get("stream"))
    call_id = f"cmpl-{uuid.uuid4()}"
    max_tokens = request.get("max_tokens") or request.get("max_completion_tokens") or defaults.max_tokens
    reservation = _admit(key=key, end_user=end_user, request=request, price=price, max_tokens=max_tokens, call_id=call_id)
    return CompletionPlan(
        call_id=call_id,
        tenant_id=key.tenant_id,
        api_key_id=key.pk,
        end_user_id=end_user.id,
        model=model,
        price=price,
        target=target,
        upstream_body=upstream_body(
            request,
            user_hash=end_user_hash(tenant_id=key.tenant_id, end_user_id=end_user.id),
            default_max_tokens=defaults.max_tokens,
        ),
        messages=request["messages"],
        stream=stream,
        forward_usage=stream and bool((request.get("stream_options") or {}).get("include_usage")),
        reservation=reservation,
    )


def _admit(*, key: ApiKey, end_user: EndUser, request: dict[str, Any], price: Price, max_tokens: int, call_id: str) -> Reservation:
    """Rate limits (requests, then tokens), then the worst case reserved against every cap.
    Raises RateLimited, CapExceeded."""
    tenant = key.tenant
    limits = ratelimits.Caller(
        tenant_id=tenant.pk, end_user_rpm=tenant.end_user_rpm, tenant_rpm=tenant.tenant_rpm,
        tenant_tpm=tenant.tenant_tpm, end_user_id=end_user.id, api_key_id=key.pk, api_key_rpm=key.rpm,
    )
    ratelimits.rate_limit_hit(caller=limits)
    prompt_tokens = _count_prompt_of(request["messages"], request["model"])
    ratelimits.rate_limit_hit(caller=limits, tokens=prompt_tokens + max_tokens)
    return cap_reserve(
        subject=Subject(tenant.pk, end_user.id, key.pk),
        amount=worst_case_cost(price=price, prompt_tokens=prompt_tokens, max_tokens=max_tokens),
        call_id=call_id,
    )


# --- after the call -----------------------------------------------------------------------


def completion_settle(
    *,
    plan: CompletionPlan,
    usage: Usage | None,
    content: str,
    outcome: str,
    latency_ms: int,
    ttft_ms: int | None,
) -> UsageRecord:
    """Write the call's one UsageRecord: the provider's usage, or our own count when it sent
    none (a broken stream, a client that left), and settle the call's reservation to its cost
    in the same transaction. Idempotent on the plan's call id."""
    with transaction.atomic():
        record = _record(plan=plan, usage=usage, content=content, outcome=outcome, latency_ms=latency_ms, ttft_ms=ttft_ms)
        if plan.reservation is not None:
            cap_settle(reservation=plan.reservation, actual=record.cost_usd)
    return record


def _record(*, plan: CompletionPlan, usage: Usage | None, content: str, outcome: str, latency_ms: int, ttft_ms: int | None) -> UsageRecord:
    return usage_record(
        usage=UsageInput(
            call_id=plan.call_id,
            tenant_id=plan.tenant_id,
            model=plan.model,
            prompt_tokens=usage.prompt_tokens if usage else _count_prompt_of(plan.messages, plan.model),
            completion_tokens=usage.completion_tokens if usage else count_text(content, plan.model),
            cached_tokens=usage.cached_tokens if usage else 0,
            estimated=usage is None,
            kind=UsageRecord.Kind.COMPLETION,
            outcome=outcome,
            end_user_id=plan.end_user_id,
            api_key_id=plan.api_key_id,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
        ),
        price=plan.price,
    )


def _count_prompt_of(messages: list[dict[str, Any]], model: str) -> int:
    try:
        return count_messages(messages, model)
    except Exception:  # noqa: BLE001 — odd content shapes: count the JSON's length instead
        return count_text(json.dumps(messages), model)


# --- models -------------------------------------------------------------------------------


def models_available(*, authorization: str) -> list[str]:
    """The models the key may call: priced, and in its allowed list when it has one."""
    key = api_key_from_authorization(authorization)
    models = sorted(ModelPrice.objects.filter(kind=ModelPrice.Kind.CHAT).values_list("model", flat=True))
    if key.allowed_models:
        models = [m for m in models if m in key.allowed_models]
    return models
