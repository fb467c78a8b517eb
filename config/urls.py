"""URL routes: admin, chat page, health, REST API (the OpenAI-compatible /v1 is in asgi.py)."""

from django.contrib import admin
from django.templatetags.static import static
from django.urls import path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from billing.api import UsageApi
from conversations.rest import api
from conversations.views import chat_page
from embed.views import embed_config, embed_js
from tenants.api import TenantDetailApi

from .health import healthz

urlpatterns = [
    path("", chat_page, name="chat"),
    path("healthz", healthz, name="healthz"),
    path("embed.js", embed_js, name="embed-js"),
    # Browsers ask every site for /favicon.ico (the admin pages have no <link rel="icon">).
    path("favicon.ico", RedirectView.as_view(url=static("embed/favicon.svg"), permanent=True)),
    path("embed/config", embed_config, name="embed-config"),
    path("admin/", admin.site.urls),
    # REST API (DRF). Ids are matched as strings: a malformed id answers the same 404 body as
    # a missing or foreign one. /api/v1/usage/ belongs to billing.
    path("api/v1/conversations/", api.ConversationListApi.as_view(), name="api-conversations"),
    path("api/v1/conversations/<str:conversation_id>/", api.ConversationDetailApi.as_view(), name="api-conversation"),
    path("api/v1/conversations/<str:conversation_id>/messages/", api.MessageListApi.as_view(), name="api-messages"),
    path("api/v1/end-users/<str:external_id>/token/", api.EndUserTokenApi.as_view(), name="api-end-user-token"),
    path("api/v1/usage/", UsageApi.as_view(), name="api-usage"),
    path("api/v1/tenant/", TenantDetailApi.as_view(), name="api-tenant"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    # /v1/… (the OpenAI-compatible endpoint) is served in front of Django: config/asgi.py.
]
