"""OpenAI-shaped error answers, and the deliberate connection cut."""

from __future__ import annotations

import math
import time
from email.utils import formatdate
from typing import Any

from .asgi import Headers


class ApiError(Exception):
    """An OpenAI-shaped error answer: HTTP status plus ``{"error": {...}}``."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        error_type: str | None = None, headers: Headers | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.error_type = error_type or _error_type(status)
        self.headers = headers or []

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class StreamCut(Exception):
    """Raised on purpose after the response started, so the server drops the connection."""


def _error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return "rate_limit_error" if status == 429 else "invalid_request_error"


def status_error(status: int, retry_after: float | None, *, as_date: bool = False) -> ApiError:
    """The error OpenAI would answer with this status (injected faults). ``as_date``: the
    Retry-After's other form, an HTTP date (whole seconds, rounded up), as some servers send."""
    headers: Headers = []
    if retry_after is not None and as_date:
        when = time.time() + math.ceil(retry_after)
        headers += [(b"retry-after", formatdate(when, usegmt=True).encode())]
    elif retry_after is not None:
        headers += [(b"retry-after", _number(retry_after).encode()),
                    (b"retry-after-ms", str(round(retry_after * 1000)).encode())]
    if status == 429:
        return ApiError(429, "Rate limit reached for requests (simulated). Please try again later.",
                        code="rate_limit_exceeded", headers=headers)
    if status == 401:
        return ApiError(401, "Incorrect API key provided (simulated).", code="invalid_api_key",
                        headers=headers)
    if status >= 500:
        return ApiError(status, "The server had an error while processing your request "
                                "(simulated).", headers=headers)
    return ApiError(status, f"Simulated error {status}.", headers=headers)


def missing_bearer() -> ApiError:
    return ApiError(401, "You didn't provide an API key. You need to provide your API key in an "
                         "Authorization header using Bearer auth (i.e. Authorization: Bearer "
                         "YOUR_KEY).", code="invalid_api_key")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
