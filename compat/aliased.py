"""A `/v1` alias's routes: the model they choose for one request, asking the request cache
before a classifier route's grading call."""

from __future__ import annotations

from typing import Any

from conversations.admission import KeyConfig, ModelNotAvailable, cached_price, price_load
from responsecache.requests import request_cached
from routing.aliases import AliasConfig, request_facts
from routing.grading import Hop
from routing.rules import GradeNeeded
from routing.selection import Grading, Routed, TurnFacts, route_choose, with_grades


async def alias_route(
    access: KeyConfig, alias: AliasConfig, *, request: dict[str, Any], prompt_tokens: int, max_tokens: int,
    grading: Grading, hop: Hop, cache_key: str | None = None,
) -> Routed:
    """The model an alias's routes choose for this request (a classifier route's grading
    call runs here, metered). A request the cache answers (`cache_key`, when the key opted in)
    is graded for nothing: it takes the alias's own model, and no model is called. Raises
    ModelNotAvailable when the alias's own model has no price."""
    prices = {}
    for name in alias.models():
        found = cached_price(access, name)
        prices[name] = await hop(price_load, access=access, model=name) if found is False else found
    default_price = prices.get(alias.default_model)
    if default_price is None:
        raise ModelNotAvailable(alias.name)
    question, depth = request_facts(request)
    facts = TurnFacts(question=question, input_tokens=prompt_tokens, tools_needed=bool(request.get("tools")),
                      max_tokens=max_tokens, depth=lambda: depth)
    cache_asked = False

    async def choose(*, grades: Any, resume: Any) -> Routed:
        nonlocal cache_asked
        options = {"default_model": alias.default_model, "default_price": default_price, "turn": facts,
                   "price_of": prices.get, "grading": grading}
        try:
            return route_choose(routes=list(alias.routes), grades=grades, **options)
        except GradeNeeded:
            if cache_key is None or cache_asked:
                raise
            cache_asked = True
            if not await hop(request_cached, tenant_id=access.tenant_id, key=cache_key):
                raise
            return route_choose(routes=[], **options)

    return await with_grades(choose, hop=hop)
