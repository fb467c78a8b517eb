"""Sign-in with throttling: repeated failed logins for one username or from one address are
refused for a while, across every web process (the counters live with the rate limits)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.core.exceptions import PermissionDenied
from limits import RateLimitItemPerMinute
from limits.strategies import MovingWindowRateLimiter

from tenants.ratelimits import limits_storage

logger = logging.getLogger(__name__)


def _item() -> RateLimitItemPerMinute:
    # N failures per window of LOGIN_FAILURE_WINDOW_MINUTES minutes.
    return RateLimitItemPerMinute(settings.LOGIN_FAILURES_ALLOWED, settings.LOGIN_FAILURE_WINDOW_MINUTES)


def _keys(request, username: str | None) -> list[tuple[str, ...]]:
    address = (request.META.get("REMOTE_ADDR") or "?") if request is not None else "?"
    return [("login", "user", (username or "").lower()), ("login", "ip", address)]


def login_throttled(request, username: str | None) -> bool:
    limiter = MovingWindowRateLimiter(limits_storage())
    return any(not limiter.test(_item(), *key) for key in _keys(request, username))


def login_failure_count(request, username: str | None) -> None:
    limiter = MovingWindowRateLimiter(limits_storage())
    for key in _keys(request, username):
        limiter.hit(_item(), *key)


class ThrottledModelBackend(ModelBackend):
    def authenticate(self, request, username=None, password=None, **kwargs):
        if login_throttled(request, username):
            logger.warning("sign-in throttled for %r", (username or "")[:100])
            # PermissionDenied stops Django trying other backends: the form shows its usual error.
            raise PermissionDenied("too many failed sign-ins; try again later")
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            login_failure_count(request, username)
        return user
