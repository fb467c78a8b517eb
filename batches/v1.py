"""`/v1/files` and `/v1/batches`: OpenAI's Files and Batch APIs, for the official SDK unchanged.

Plain Django views (the `/v1` ASGI app hands these paths to Django, whose multipart parser
reads uploads), authenticated by the same API keys as `/v1`, tenant-scoped: another tenant's
file or batch answers exactly like a missing one. Errors use OpenAI's body, mapped once here.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from billing.caps import CapExceeded
from tenants.authentication import api_key_from_authorization
from tenants.models import ApiKey
from tenants.services import InvalidApiKey

from . import services
from .shapes import batch_object, file_object
from .validation import InvalidBatch

View = Callable[..., HttpResponse]
ERROR_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JsonResponse:
    kind = "server_error" if status >= 500 else ERROR_TYPES.get(status, "invalid_request_error")
    return JsonResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status)


def openai_api(*methods: str) -> Callable[[View], View]:
    """Authenticate the key, allow `methods`, and map every domain error to OpenAI's body."""

    def decorate(view: View) -> View:
        @csrf_exempt
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                return _error(405, f"method {request.method} is not allowed here")
            try:
                key = api_key_from_authorization(request.headers.get("Authorization", ""))
                return view(request, key, *args, **kwargs)
            except InvalidApiKey as error:
                return _error(401, str(error), code="invalid_api_key")
            except InvalidBatch as error:
                return _error(error.status, error.message, param=error.param, code=error.code)
            except CapExceeded as error:
                response = _error(429, str(error), code="spending_cap_exceeded")
                if error.retry_after is not None:
                    response["Retry-After"] = str(math.ceil(error.retry_after))
                return response

        return wrapped

    return decorate


def _json_body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        raise InvalidBatch("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidBatch("the request body must be a JSON object")
    return body


@openai_api("POST")
def files_api(request: HttpRequest, key: ApiKey) -> HttpResponse:
    upload = request.FILES.get("file")
    if upload is None:
        raise InvalidBatch("'file' is required (multipart/form-data)", param="file")
    if upload.size is not None and upload.size > settings.BATCH_FILE_MAX_BYTES:
        raise InvalidBatch(f"the file is {upload.size} bytes; at most {settings.BATCH_FILE_MAX_BYTES} are allowed",
                           param="file", status=413)
    file = services.file_create(tenant_id=key.tenant_id, purpose=request.POST.get("purpose", ""),
                                filename=upload.name or "", content=upload.read())
    return JsonResponse(file_object(file))


@openai_api("GET")
def file_api(request: HttpRequest, key: ApiKey, file_id: str) -> HttpResponse:
    return JsonResponse(file_object(services.access_file(tenant_id=key.tenant_id, file_id=file_id)))


@openai_api("GET")
def file_content_api(request: HttpRequest, key: ApiKey, file_id: str) -> HttpResponse:
    file = services.access_file(tenant_id=key.tenant_id, file_id=file_id)
    return HttpResponse(bytes(file.content), content_type="application/octet-stream")


@openai_api("GET", "POST")
def batches_api(request: HttpRequest, key: ApiKey) -> HttpResponse:
    if request.method == "GET":
        page, more = services.batches_list(tenant_id=key.tenant_id, after=request.GET.get("after"),
                                           limit=request.GET.get("limit"))
        data = [batch_object(batch) for batch in page]
        return JsonResponse({"object": "list", "data": data, "has_more": more,
                             "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None})
    body = _json_body(request)
    batch = services.batch_create(
        api_key=key, input_file_id=body.get("input_file_id"), endpoint=body.get("endpoint"),
        completion_window=body.get("completion_window"), metadata=body.get("metadata"),
    )
    batch.refresh_from_db()  # embedded mode (eager Celery) may have started it already
    return JsonResponse(batch_object(batch))


@openai_api("GET")
def batch_api(request: HttpRequest, key: ApiKey, batch_id: str) -> HttpResponse:
    batch = services.access_batch(tenant_id=key.tenant_id, batch_id=batch_id)
    services.batch_nudge(batch=batch)
    batch.refresh_from_db()
    return JsonResponse(batch_object(batch))


@openai_api("POST")
def batch_cancel_api(request: HttpRequest, key: ApiKey, batch_id: str) -> HttpResponse:
    batch = services.access_batch(tenant_id=key.tenant_id, batch_id=batch_id)
    return JsonResponse(batch_object(services.batch_cancel(batch=batch)))
