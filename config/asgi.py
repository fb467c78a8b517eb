"""ASGI entry point: Django for HTTP, Channels for WebSockets (origin-checked, session-aware)."""

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402  (needs the app registry)
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from conversations.ws.routing import websocket_urlpatterns  # noqa: E402
from conversations.ws.sockets import SocketOriginValidator  # noqa: E402

http_app = django_asgi_app
if settings.SERVE_STATIC:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    http_app = ASGIStaticFilesHandler(django_asgi_app)

# The OpenAI-compatible endpoint (/v1/…) answers before Django's middleware stack: it is the
# streaming hot path, and bearer-authenticated JSON needs none of that stack.
from compat.openai_api import OpenAICompatibleApp  # noqa: E402

http_app = OpenAICompatibleApp(http_app)

from observability.asgi import ObservedApp  # noqa: E402

# Outermost: a request id for every request and socket (logs, X-Request-ID), and the counts
# of what each surface answers (/metrics).
application: Any = ObservedApp(ProtocolTypeRouter(
    {
        "http": http_app,
        # A cookie-authenticated socket is open to cross-site hijacking without the origin check;
        # a token socket may come with no Origin at all (apps, servers, scripts).
        "websocket": SocketOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
))

if settings.SIMULATOR_MOUNTED:
    # Embedded demo: the model simulator answers at /simulator/v1 inside this same process, so
    # `make run` is the whole system in one process. Off unless DEBUG (or asked for).
    from simulator import create_app

    _simulator = create_app(ttft_ms=settings.SIMULATOR_TTFT_MS, tokens_per_second=settings.SIMULATOR_TPS)
    _parley = application

    async def application(scope, receive, send):  # type: ignore[no-redef]
        if scope["type"] == "http" and scope["path"].startswith("/simulator/"):
            return await _simulator({**scope, "root_path": scope.get("root_path", "") + "/simulator"}, receive, send)
        return await _parley(scope, receive, send)
