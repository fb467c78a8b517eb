"""A tenant's allowed origins: the websites whose pages may open end-user token sockets (the
embeddable chat widget). One origin is `scheme://host[:port]`, as a browser sends it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

from django.core import signing

from .models import Tenant
from .services import END_USER_TOKEN_SALT

MAX_ORIGINS = 50
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
# What an origin may look like (also the REST schema's `pattern`): a DNS name or IPv4 address.
ORIGIN_PATTERN = rf"^[hH][tT][tT][pP][sS]?://[A-Za-z0-9](?:[A-Za-z0-9.-]{{0,251}}[A-Za-z0-9])?(?::{_PORT})?/?$"


class InvalidOrigin(ValueError):
    pass


def origin_normalize(value: str) -> str:
    """`https://Shop.Example:443` → `https://shop.example`. Raises InvalidOrigin for anything
    but http(s)://host[:port] — a path, query, fragment, credentials or wildcard match no
    browser's Origin header and would only hide a typo."""
    text = str(value).strip()
    if not re.fullmatch(ORIGIN_PATTERN, text):
        raise InvalidOrigin(f"{text!r} is not an origin: http(s)://host[:port], no path, query or wildcard")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise InvalidOrigin(f"{text!r} is not an origin (scheme://host[:port])") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidOrigin(f"{text!r} is not an origin: it needs http:// or https:// and a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc or "*" in text:
        raise InvalidOrigin(f"{text!r} is not an origin: no path, query, credentials or wildcard")
    host = parts.hostname.lower()
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def origins_parse(values: Iterable[str]) -> list[str]:
    """Normalised, de-duplicated, in order; raises InvalidOrigin on the first bad one."""
    origins = list(dict.fromkeys(origin_normalize(value) for value in values if str(value).strip()))
    if len(origins) > MAX_ORIGINS:
        raise InvalidOrigin(f"at most {MAX_ORIGINS} allowed origins")
    return origins


def tenant_allowed_origins_set(*, tenant: Tenant, origins: Iterable[str]) -> list[str]:
    """Replace the tenant's allowed origins (validated). Raises InvalidOrigin."""
    tenant.allowed_origins = origins_parse(origins)
    tenant.save(update_fields=["allowed_origins"])  # a watched model: cached configuration reloads
    return tenant.allowed_origins


def token_allowed_origins(token: str) -> list[str]:
    """The allowed origins of the tenant an end-user token names ([] for a bad token). Only the
    signature is checked here: the socket authenticates the token fully once it is open.
    Synchronous ORM."""
    try:
        tenant_id = int(signing.loads(token, salt=END_USER_TOKEN_SALT)["t"])
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        return []
    found = Tenant.objects.filter(pk=tenant_id, is_active=True).values_list("allowed_origins", flat=True).first()
    return [origin for origin in found or [] if isinstance(origin, str)]
