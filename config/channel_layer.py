"""The Redis channel layer, riding out a Redis restart.

channels_redis raises from `receive` when Redis is away, and a consumer whose channel receive
raises dies with its socket. Here a receive waits for Redis to come back instead (channels_redis
releases its receive lock and buffer on that error, so trying again is safe); sends still fail
fast, and their callers answer "unavailable, retry".
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels_redis.core import RedisChannelLayer as _RedisChannelLayer
from redis.exceptions import ConnectionError, TimeoutError

logger = logging.getLogger(__name__)

RECEIVE_RETRY_SECONDS = 0.5


class RedisChannelLayer(_RedisChannelLayer):
    async def receive(self, channel: str) -> dict[str, Any]:
        while True:
            try:
                return await super().receive(channel)
            except (ConnectionError, TimeoutError):
                logger.warning("channel layer: Redis unavailable; receiving again shortly")
                await asyncio.sleep(RECEIVE_RETRY_SECONDS)
