"""The project-wide REST pieces: the one error mapping (DRF's EXCEPTION_HANDLER), the error
shape and its OpenAPI entries, the API-key base view, and the schema's strict-body hook."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from drf_spectacular.utils import OpenApiResponse
from rest_framework import exceptions, serializers, status
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from conversations.errors import EndUserBlocked, ShuttingDown, TurnFailed
from conversations.protocol import DOMAIN_ERRORS, error_event_for
from observability.context import request_id_current
from streaming import outages
from tenants.authentication import ApiKeyAuthentication
from tenants.models import ApiKey


class ErrorDetailSerializer(serializers.Serializer):
    code = serializers.ChoiceField(
        choices=[
            "invalid_request", "unauthorized", "not_found", "rate_limited", "spending_cap_exceeded",
            "moderation_blocked", "upstream_error", "upstream_timeout", "cancelled", "conflict",
        ]
    )
    message = serializers.CharField()
    retry_after = serializers.FloatField(required=False)
    request_id = serializers.CharField(required=False, help_text="The request's id (also the X-Request-ID header).")
    fields = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()), required=False,
        help_text="Per-field problems, for invalid_request.",
    )


class ErrorSerializer(serializers.Serializer):
    """The one error shape of the REST API."""

    error = ErrorDetailSerializer()


class Conflict(exceptions.APIException):
    """The request is well formed but the object's state refuses it (e.g. deleting an assistant
    that conversations still use): 409 `conflict`."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


# --- errors: the one mapping for the REST surface (every app's views) ----------------------

STATUS_OF_CODE = {
    "invalid_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "cancelled": 409,
    "conflict": 409,
    "moderation_blocked": 422,
    "rate_limited": 429,
    "spending_cap_exceeded": 429,
    "upstream_error": 502,
    "upstream_timeout": 504,
}


def _error_response(
    code: str, message: str, *, status_code: int | None = None, **extra: Any
) -> Response:
    body = {"code": code, "message": message, **{k: v for k, v in extra.items() if v is not None}}
    if request_id := request_id_current():  # to quote when reporting the failure
        body["request_id"] = request_id
    response = Response({"error": body}, status=status_code or STATUS_OF_CODE[code])
    if body.get("retry_after") is not None:
        response["Retry-After"] = str(max(1, round(body["retry_after"])))
        if code == "rate_limited":
            response["x-ratelimit-remaining-requests"] = "0"
    return response


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """REST_FRAMEWORK["EXCEPTION_HANDLER"]: domain and DRF errors → `{"error": {code, message}}`."""
    if isinstance(exc, DOMAIN_ERRORS):
        event = error_event_for(exc)
        extra = {"retry_after": event.retry_after, **event.extra}
        if isinstance(exc, TurnFailed):
            extra["message_id"] = exc.message_id
        # The key is good, the end user is not: 403, as on /v1 (a 401 says "fix your key").
        status_code = status.HTTP_403_FORBIDDEN if isinstance(exc, EndUserBlocked) else None
        # Draining (another process takes the turn) or PostgreSQL/Redis away for a moment.
        if isinstance(exc, (ShuttingDown, *outages.UNAVAILABLE)):
            status_code = status.HTTP_503_SERVICE_UNAVAILABLE
        return _error_response(event.code, event.message, status_code=status_code, **extra)
    if isinstance(exc, Http404):
        return _error_response("not_found", "not found")
    if isinstance(exc, RequestDataTooBig):  # past DATA_UPLOAD_MAX_MEMORY_SIZE
        return _error_response("invalid_request", "the request body is too large", status_code=413)
    if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):
        response = _error_response("unauthorized", str(exc.detail))
        response["WWW-Authenticate"] = ApiKeyAuthentication.keyword
        return response
    if isinstance(exc, exceptions.ValidationError):
        return _error_response("invalid_request", "invalid request body", fields=_field_errors(exc.detail))
    if isinstance(exc, exceptions.NotFound):
        return _error_response("not_found", str(exc.detail))
    if isinstance(exc, Conflict):
        return _error_response("conflict", str(exc.detail))
    if isinstance(exc, exceptions.Throttled):
        return _error_response("rate_limited", str(exc.detail), retry_after=exc.wait)
    if isinstance(exc, exceptions.APIException):  # parse errors, 405, 406, 415
        return _error_response("invalid_request", str(exc.detail), status_code=exc.status_code)
    return None  # a bug: Django's 500


def _field_errors(detail: Any) -> dict[str, list[str]]:
    if isinstance(detail, dict):
        return {str(k): [str(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in detail.items()}
    return {"non_field_errors": [str(v) for v in (detail if isinstance(detail, list) else [detail])]}


def error_responses(*codes: str) -> dict[int, OpenApiResponse]:
    """Schema entries for the error answers a view can give."""
    statuses = sorted({STATUS_OF_CODE[code] for code in codes})
    return {s: OpenApiResponse(ErrorSerializer, description=f"error ({', '.join(c for c in codes if STATUS_OF_CODE[c] == s)})") for s in statuses}


# --- base ---------------------------------------------------------------------------------


class TenantApi(APIView):
    authentication_classes = [ApiKeyAuthentication]
    permission_classes = [IsAuthenticated]

    @property
    def api_key(self) -> ApiKey:
        return self.request.auth

    @property
    def tenant_id(self) -> int:
        return self.request.auth.tenant_id

    @property
    def member_end_user_id(self) -> Any:
        """A member's session (tenants.authentication.MemberSession) reads as this one end user
        only; None for an API key, which acts for its whole tenant."""
        return getattr(self.request.auth, "end_user_id", None)


def strict_request_bodies(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: request bodies refuse unknown fields (see
    conversations/rest/serializers.StrictSerializer), and the schema says so."""
    for name, component in result.get("components", {}).get("schemas", {}).items():
        if name.endswith("Request") and component.get("type") == "object":
            component["additionalProperties"] = False
    return result
