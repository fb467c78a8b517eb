"""HTML views: the built-in chat page for tenant members."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from tenants.models import Membership

from .models import Assistant


@login_required
def chat_page(request: HttpRequest) -> HttpResponse:
    memberships = list(
        Membership.objects.filter(user=request.user, tenant__is_active=True).select_related("tenant").order_by("id")
    )
    wanted = request.GET.get("tenant")
    membership = next((m for m in memberships if m.tenant.slug == wanted), memberships[0] if memberships else None)
    if membership is None:
        return render(request, "conversations/no_tenant.html", status=403)
    assistants = list(
        Assistant.objects.for_tenant(membership.tenant).order_by("-is_default", "slug").values("slug", "name", "model")
    )
    return render(
        request,
        "conversations/chat.html",
        {
            "tenant": membership.tenant,
            "tenants": [m.tenant for m in memberships],
            "assistants": assistants,
        },
    )
