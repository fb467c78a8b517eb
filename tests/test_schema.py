"""The OpenAPI document against the running API: schemathesis generates requests from
/api/schema/ (valid and invalid ones) and checks that no answer is a 5xx and that every answer
matches what the schema documents (status, content type, body)."""

from __future__ import annotations

import json
import uuid

import httpx2
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from conversations.gatekeepers import access_assistant
from conversations.models import Conversation
from tenants.models import ApiKey
from tenants.services import end_user_get_or_create

pytestmark = pytest.mark.django_db(transaction=True)



def _document() -> dict:
    """The document /api/schema/ serves (test_served_schema_is_this_document checks it)."""
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.renderers import OpenApiJsonRenderer

    return json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(request=None, public=True)))


# Built at import (Django is set up by then), not through a fixture: the operations are the
# test's parameters, so they must be known when pytest collects.
DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture
def api_key(tenant_factory, sim) -> str:
    return tenant_factory().api_key


def test_served_schema_is_this_document(parley):
    served = httpx2.get(f"{parley.url}/api/schema/?format=json", timeout=10)
    assert served.status_code == 200 and served.json() == DOCUMENT


def test_the_document_says_what_the_api_checks():
    """Routes are documented with the schema the routing engine validates them against, and a
    price change does not offer the model (it is the path's)."""
    from routing.rules import ROUTES_SCHEMA

    components = DOCUMENT["components"]["schemas"]
    routes = components["Assistant"]["properties"]["routes"]
    assert routes["items"]["required"] == ["name", "model"] == ROUTES_SCHEMA["items"]["required"]
    patch = DOCUMENT["paths"]["/api/v1/prices/{model}/"]["patch"]["requestBody"]["content"]["application/json"]
    changed = components[patch["schema"]["$ref"].rsplit("/", 1)[-1]]
    assert "model" not in changed["properties"] and "input_per_million" in changed["properties"]


def _valid_for_the_tenant(case) -> None:
    """What a schema cannot say, made true of a valid case (tests/test_assistants_api.py and
    tests/test_tenant_prices.py hold each rule): models priced for the tenant, tools that
    exist, well-formed routes, a slug or model the tenant has not used yet."""
    body = case.body
    if case.path.startswith("/api/v1/assistants/"):
        fixed = {"model": "gpt-4o-mini", "summary_model": "gpt-4o-mini", "tools": [], "routes": [], "tool_choice": "auto",
                 "slug": f"s-{uuid.uuid4().hex[:12]}"}
        body.update({name: value for name, value in fixed.items() if name in body})
    if case.path == "/api/v1/prices/" and "model" in body:
        body["model"] = f"m-{uuid.uuid4().hex[:12]}"


@schema.parametrize()
@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # a flaky test is a bug: the same examples every run
)
def test_api_matches_its_schema(case, parley, api_key):
    setup = ApiKey.objects.select_related("tenant").get(prefix=api_key.split("_")[1])
    if case.path_parameters and "conversation_id" in case.path_parameters:
        # Half the time a real conversation, so the success answers are checked too.
        if hash(repr(case.body)) % 2 == 0:
            end_user = end_user_get_or_create(tenant_id=setup.tenant.pk, external_id="schema")
            conversation = Conversation.objects.create(
                tenant=setup.tenant, assistant=access_assistant(tenant_id=setup.tenant_id, slug=None), end_user=end_user
            )
            case.path_parameters["conversation_id"] = str(conversation.id)
    if case.meta.generation.mode.is_positive and isinstance(case.body, dict):
        _valid_for_the_tenant(case)
    if case.query and "cursor" in case.query and case.meta.generation.mode.is_positive:
        # A cursor is an opaque token the API hands out in `next`/`previous`: a generated
        # string is never one and is a 400 (tests/test_malformed_input.py), so a valid case
        # asks for the first page.
        del case.query["cursor"]
    # A real key replaces the generated one; a case generated *without* the header (a negative
    # case whose mutation is the missing Authorization) is sent without it, as generated.
    dropped = case.headers is not None and not any(name.lower() == "authorization" for name in case.headers)
    headers = {} if dropped else {"Authorization": f"Bearer {api_key}"}
    case.call_and_validate(base_url=parley.url, headers=headers, timeout=20)
