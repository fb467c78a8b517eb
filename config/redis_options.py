"""Connection options every Redis client of Parley shares, so a Redis restart is an outage of
seconds, not a restart of Parley: a pooled connection idle for REDIS_HEALTH_CHECK_SECONDS is
pinged before use, and a command that meets a dead connection (reset, refused while Redis
restarts, timed out) reconnects and retries with backoff instead of failing its caller.

No Django import: settings.py builds the cache's and the channel layer's options from it.
"""

from __future__ import annotations

import os
from typing import Any


def _number(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def redis_options(*, asynchronous: bool) -> dict[str, Any]:
    """Keyword arguments for a redis-py connection pool (`from_url(url, **options)`);
    `asynchronous` for redis.asyncio pools, whose Retry type differs."""
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError, TimeoutError

    if asynchronous:
        from redis.asyncio.retry import Retry
    else:
        from redis.retry import Retry  # type: ignore[assignment]
    return {
        "socket_connect_timeout": _number("REDIS_CONNECT_TIMEOUT", 2),
        "health_check_interval": _number("REDIS_HEALTH_CHECK_SECONDS", 10),
        "socket_keepalive": True,
        # 3 retries over ~1.5 s: a restart shorter than that is invisible to callers; a longer
        # one fails fast, and each surface answers "unavailable, retry" (503 / an error frame).
        "retry": Retry(ExponentialWithJitterBackoff(base=0.1, cap=1.0), int(_number("REDIS_RETRIES", 3))),
        "retry_on_error": [ConnectionError, TimeoutError],
    }
