"""`/v1` model aliases: each tenant's names (e.g. `auto`), kept per process under its
configuration version (`tenants.freshness`: an alias saved or deleted moves it), and the
routing of one `/v1` request through an alias."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache

from tenants.freshness import MAX_AGE_SECONDS

from .models import ModelAlias


@dataclass(frozen=True)
class AliasConfig:
    name: str
    default_model: str
    routes: tuple[dict[str, Any], ...]

    def models(self) -> set[str]:
        """Every model the alias may call or ask for a grade: their prices are loaded first."""
        named = {self.default_model}
        for route in self.routes:
            named.add(route.get("model", ""))
            classifier = (route.get("when") or {}).get("classifier") or {}
            named.add(classifier.get("model", ""))
        return named - {""}


_lock = threading.Lock()
_aliases: LRUCache = LRUCache(maxsize=10_000)  # tenant id → (version, loaded_at, {name: AliasConfig})


def aliases_clear() -> None:
    with _lock:
        _aliases.clear()


def cached_aliases(tenant_id: int, version: int) -> dict[str, AliasConfig] | None:
    with _lock:
        found = _aliases.get(tenant_id)
    if found is None or found[0] != version or time.monotonic() - found[1] > MAX_AGE_SECONDS:
        return None
    return found[2]


def aliases_load(*, tenant_id: int, version: int) -> dict[str, AliasConfig]:
    """The tenant's aliases, read afresh (a database thread) and cached under `version`."""
    aliases = {
        alias.name: AliasConfig(name=alias.name, default_model=alias.default_model, routes=tuple(alias.routes or ()))
        for alias in ModelAlias.objects.for_tenant(tenant_id)
    }
    with _lock:
        _aliases[tenant_id] = (version, time.monotonic(), aliases)
    return aliases


def alias_names(tenant_id: int) -> list[str]:
    return sorted(ModelAlias.objects.for_tenant(tenant_id).values_list("name", flat=True))


def request_facts(request: dict[str, Any]) -> tuple[str, int]:
    """A `/v1` request's question (the last user message's text) and depth (its user messages)."""
    users = [message for message in request.get("messages") or [] if message.get("role") == "user"]
    if not users:
        return "", 0
    content = users[-1].get("content")
    if isinstance(content, list):
        content = " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return str(content or ""), len(users)
