"""The socket side's database hops: sync ORM work from async code, on a connection kept between hops.

Channels' `database_sync_to_async` closes the thread's connection before and after every hop
unless CONN_MAX_AGE says to keep it, so with the default CONN_MAX_AGE=0 every hop of a socket
turn (authenticate, admit, finish, release) opened a new PostgreSQL connection: a handshake of
2-20 ms (the latter under load) on the one thread all such hops share, which at 1,000 streams
was the largest single cost of the web process. CONN_MAX_AGE>0 is no fix under ASGI: Django's
request threads come and go, and each would leave a connection behind.

Here the connection of the thread these hops run on (asgiref's one thread-sensitive thread,
outside requests) is kept, and checked the way /v1's database threads check theirs
(conversations/openai_api.py): before a hop, a kept connection that died with a PostgreSQL
restart is replaced (a SELECT 1) instead of failing the hop; after it, a connection that saw an
error or was left inside a transaction is closed, and the next hop reconnects.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import SyncToAsync
from channels.db import DatabaseSyncToAsync
from django.db import connection


def connection_checked() -> None:
    """Replace this thread's kept connection if it no longer answers."""
    if connection.connection is not None and not connection.is_usable():
        connection.close()


def connection_settled() -> None:
    """Drop this thread's connection if it is broken or mid-transaction."""
    if connection.errors_occurred or connection.in_atomic_block:
        connection.close()


class KeptConnectionSyncToAsync(SyncToAsync):
    """`database_sync_to_async` with the thread's connection kept between hops. Inside an HTTP
    request (Django gives each its own thread-sensitive thread, which ends with it) it does what
    Channels' does: a connection kept there would be left behind with the thread."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if SyncToAsync.thread_sensitive_context.get(None) is not None:
            return await DatabaseSyncToAsync(self.func, thread_sensitive=self._thread_sensitive)(*args, **kwargs)
        return await super().__call__(*args, **kwargs)

    def thread_handler(self, loop: Any, *args: Any, **kwargs: Any) -> Any:
        connection_checked()
        try:
            return super().thread_handler(loop, *args, **kwargs)
        finally:
            connection_settled()


database_sync_to_async = KeptConnectionSyncToAsync


async def connection_ready() -> None:
    """Before async ORM calls (`aget`, …) that run on the same thread: a stale connection is
    replaced first (what Channels' `aclose_old_connections` is for, without a new connection)."""
    await database_sync_to_async(_nothing)()  # the hop checks the connection first


def _nothing() -> None:
    return None
