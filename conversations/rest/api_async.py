"""An async DRF view: DRF's own authentication, permissions, throttles, exception handler and
renderers, run from an async dispatch, so a handler that awaits (a turn's reply) holds no thread.

DRF's views are synchronous: under ASGI Django runs them on a thread, and a sync view that
waits for a generation parks that thread for the whole reply. Only the short database legs
(authentication, the gatekeeper, serialising the stored reply) go to a thread here, each one
hop. adrf offers the same dispatch, but it replaces DRF's Request with its own and brings async
serializers and permissions this API does not need; the dispatch below is DRF's `dispatch`
with the handler awaited.
"""

from __future__ import annotations

from inspect import iscoroutinefunction
from typing import Any

from asgiref.sync import sync_to_async
from django.http import HttpRequest, HttpResponseBase


class AsyncDispatch:
    """Mix into a DRF APIView (before it): `async def` handlers are awaited, sync ones (GET
    lists) run on a thread as Django would run the whole view."""

    view_is_async = True  # Django's as_view() then marks the view a coroutine function

    async def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        self.args, self.kwargs = args, kwargs
        request = self.initialize_request(request, *args, **kwargs)
        self.request = request
        self.headers = self.default_response_headers
        try:
            # Authentication reads the API key: one short hop.
            await sync_to_async(self.initial)(request, *args, **kwargs)
            method = request.method.lower()
            handler = getattr(self, method, None) if method in self.http_method_names else None
            handler = handler or self.http_method_not_allowed
            if iscoroutinefunction(handler):
                response = await handler(request, *args, **kwargs)
            else:
                response = await sync_to_async(handler)(request, *args, **kwargs)
        except Exception as exc:
            response = self.handle_exception(exc)
        self.response = self.finalize_response(request, response, *args, **kwargs)
        return self.response
