"""The `/v1` endpoint's database threads: a few long-lived threads that keep their connections."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.db import InterfaceError, OperationalError, connection

# The endpoint's database work runs on a few long-lived threads that keep their connections.
# Through Django's per-request path each call would run in a fresh thread (the request's
# ThreadSensitiveContext) and, with CONN_MAX_AGE=0, open a new connection: ~3 ms and a
# connection handshake's CPU before every first token. Here the connections are a bounded set
# (one per thread), not one per request or per open stream; none is held while streaming.
# Two pools: what a call waits on before its first token (configuration loads, the
# reservation) never queues behind the bookkeeping of finished streams.
DB_THREADS = 4
_before_executor = ThreadPoolExecutor(max_workers=DB_THREADS, thread_name_prefix="openai-db")
_after_executor = ThreadPoolExecutor(max_workers=DB_THREADS, thread_name_prefix="openai-settle")


def _in_db_thread(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    # These threads bypass Django's request signals, so nothing else checks their kept
    # connection: one that died with a PostgreSQL restart is replaced before any query is
    # sent (a SELECT 1, ~0.1 ms), instead of failing this call.
    global _away
    if connection.connection is not None and not connection.is_usable():
        connection.close()
    try:
        result = fn(**kwargs)
    except (OperationalError, InterfaceError):
        _away = True
        raise
    else:
        _away = False
        return result
    finally:
        if connection.errors_occurred or connection.in_atomic_block:
            connection.close()  # broken or left mid-transaction: the next call reconnects


# PostgreSQL failed the last query of these threads. A caller admitted from the process's
# cache needs no query, so without this a call would reach the provider during an outage and
# only its booking would wait (compat/calls.py).
_away = False


def database_away() -> bool:
    return _away


def database_ping() -> None:
    """A query that fails while PostgreSQL is away (and clears `database_away` once it is back)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def db(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Run a synchronous service on the endpoint's database threads (before the stream)."""
    return await asyncio.get_running_loop().run_in_executor(_before_executor, _in_db_thread, fn, kwargs)


async def db_after(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """`db` for the work after a stream (the UsageRecord and the settlement)."""
    return await asyncio.get_running_loop().run_in_executor(_after_executor, _in_db_thread, fn, kwargs)
