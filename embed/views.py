"""GET /embed.js (the <parley-chat> element with its vendored libraries) and GET /embed/config
(what the element cannot learn over the socket: whether this page may open it, and whether the
model is the built-in simulator). Both are read by other origins' pages: CORS `*`, no cookies."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from conversations.ws.sockets import origin_allowed, origin_parse
from tenants.models import Membership
from tenants.origins import token_allowed_origins
from tenants.services import InvalidEndUserToken, credential_default, end_user_token_authenticate

STATIC = Path(__file__).resolve().parent / "static" / "embed"
# The vendored UMD builds run inside a function that gives them a CommonJS `module`, so they
# neither read a host page's AMD `define` nor leave globals on it.
VENDORED = (("markdownit", "vendor/markdown-it.umd.min.js"), ("DOMPurify", "vendor/purify.min.js"))
CACHE_SECONDS = 300  # a deploy reaches embedding pages within five minutes


@cache
def embed_script() -> tuple[bytes, str]:
    """The script and its ETag, built once per process from the static files."""
    parts = ['"use strict";\n(function () {\nconst vendor = {};\n']
    for name, path in VENDORED:
        source = (STATIC / path).read_text()
        parts.append(f"(function (module, exports, define) {{\n{source}\nvendor.{name} = module.exports;\n}})"
                     "({ exports: {} }, {}, undefined);\n")
    parts.append((STATIC / "parley-chat.js").read_text())
    parts.append("\n})();\n")
    body = "".join(parts).encode()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


@require_GET
def embed_js(request: HttpRequest) -> HttpResponse:
    body, etag = embed_script()
    if request.headers.get("If-None-Match") == etag:
        response = HttpResponse(status=304)
    else:
        response = HttpResponse(body, content_type="text/javascript; charset=utf-8")
    response["ETag"] = etag
    response["Cache-Control"] = f"public, max-age={CACHE_SECONDS}"
    response["Access-Control-Allow-Origin"] = "*"
    return response


def simulated(base_url: str) -> bool:
    """Is this provider URL Parley's built-in simulator (what `make run` seeds without an
    OpenAI key)? It is mounted at /simulator/v1 of a Parley server."""
    return urlsplit(base_url).path.rstrip("/").endswith("/simulator/v1")


@require_GET
def embed_config(request: HttpRequest) -> JsonResponse:
    """`?token=` (an end-user token) or a member's session (`?tenant=`): {"origin_allowed",
    "simulator"}; 401 {"error": "unauthorized"} for neither. `origin_allowed` answers for the
    page's `Origin` header, so the widget can say why its socket was refused."""
    tenant_id = _tenant_id(request)
    if tenant_id is None:
        response = JsonResponse({"error": "unauthorized"}, status=401)
    else:
        credential = credential_default(tenant_id=tenant_id)
        origin = request.headers.get("Origin")
        response = JsonResponse({
            "origin_allowed": origin is None or _origin_allowed(request.GET.get("token", ""), origin),
            "simulator": credential is not None and simulated(credential.base_url),
        })
    response["Access-Control-Allow-Origin"] = "*"
    response["Cache-Control"] = "no-store"
    return response


def _tenant_id(request: HttpRequest) -> int | None:
    token = request.GET.get("token", "")
    if token:
        try:
            return end_user_token_authenticate(token)[0].tenant_id
        except InvalidEndUserToken:
            return None
    if not request.user.is_authenticated:
        return None
    memberships = Membership.objects.filter(user=request.user, tenant__is_active=True).order_by("id")
    if request.GET.get("tenant"):
        memberships = memberships.filter(tenant__slug=request.GET["tenant"])
    return memberships.values_list("tenant_id", flat=True).first()


def _origin_allowed(token: str, origin: str) -> bool:
    tenant_origins = token_allowed_origins(token) if token else []
    return origin_allowed(origin_parse(origin), token=bool(token), tenant_origins=tenant_origins)
