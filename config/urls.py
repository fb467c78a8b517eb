"""URL routes: admin, chat page, health, REST API (the OpenAI-compatible /v1 is in asgi.py)."""

from django.contrib import admin
from django.http import HttpRequest, HttpResponsePermanentRedirect
from django.templatetags.static import static
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from assistants import api as assistants
from billing.api import UsageApi
from billing.prices_api import PriceDetailApi, PriceListApi
from conversations.rest import api
from conversations.views import chat_page
from embed.views import embed_config, embed_js
from observability.exposition import metrics_view
from tenants.api import TenantDetailApi

from .health import healthz

admin.site.site_header = "Parley"
admin.site.site_title = "Parley admin"
admin.site.index_title = "Administration"


def favicon(request: HttpRequest) -> HttpResponsePermanentRedirect:
    """Browsers ask /favicon.ico of pages that link none (the Swagger UI, error pages)."""
    return HttpResponsePermanentRedirect(static("favicon.svg"))


urlpatterns = [
    path("favicon.ico", favicon, name="favicon"),
    path("", chat_page, name="chat"),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics_view, name="metrics"),
    path("embed.js", embed_js, name="embed-js"),
    path("embed/config", embed_config, name="embed-config"),
    path("admin/", admin.site.urls),
    # REST API (DRF). Ids are matched as strings: a malformed id answers the same 404 body as
    # a missing or foreign one. /api/v1/usage/ belongs to billing.
    path("api/v1/conversations/", api.ConversationListApi.as_view(), name="api-conversations"),
    path("api/v1/conversations/<str:conversation_id>/", api.ConversationDetailApi.as_view(), name="api-conversation"),
    path("api/v1/conversations/<str:conversation_id>/messages/", api.MessageListApi.as_view(), name="api-messages"),
    path("api/v1/end-users/<str:external_id>/token/", api.EndUserTokenApi.as_view(), name="api-end-user-token"),
    path("api/v1/usage/", UsageApi.as_view(), name="api-usage"),
    path("api/v1/assistants/", assistants.AssistantListApi.as_view(), name="api-assistants"),
    path("api/v1/assistants/<str:slug>/", assistants.AssistantDetailApi.as_view(), name="api-assistant"),
    # Prices belong to billing: the tenant's own rows, and the global list it falls back on.
    path("api/v1/prices/", PriceListApi.as_view(), name="api-prices"),
    # Any model name (vLLM's carry a slash); an odd one answers the API's own 404 body.
    re_path(r"^api/v1/prices/(?P<model>[\s\S]+)/$", PriceDetailApi.as_view(), name="api-price"),
    # The Batch API (/v1/files, /v1/batches: OpenAI's paths, handed to Django by the /v1 app for
    # its multipart parsing) and /api/v1/batches/.
    path("", include("batches.urls")),
    path("api/v1/tenant/", TenantDetailApi.as_view(), name="api-tenant"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    # /v1/… (the OpenAI-compatible endpoint) is served in front of Django: config/asgi.py.
]
