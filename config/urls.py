"""URL routes: admin, chat page, health, REST API."""

from django.contrib import admin
from django.urls import path

from conversations.views import chat_page

from .health import healthz

urlpatterns = [
    path("", chat_page, name="chat"),
    path("healthz", healthz, name="healthz"),
    path("admin/", admin.site.urls),
]
