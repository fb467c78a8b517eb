"""The socket side's database hops (config/db.py) keep their thread's connection: one
connection for every hop instead of a new one per hop, a dead one replaced before a hop uses it,
and inside an HTTP request a hop still closes what it opened."""

from __future__ import annotations

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from django.conf import settings
from django.db import connection

from config.db import database_sync_to_async

pytestmark = pytest.mark.django_db(transaction=True)


def _connection() -> object:
    connection.ensure_connection()
    return connection.connection


def _count_query() -> int:
    from conversations.models import Conversation

    return Conversation.objects.count()


async def test_hops_share_one_connection():
    first = await database_sync_to_async(_connection)()
    await database_sync_to_async(_count_query)()
    assert await database_sync_to_async(_connection)() is first


async def test_a_failed_hop_gives_the_next_a_fresh_connection():
    def failing() -> None:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SELECT no_such_column FROM conversations_conversation")

    first = await database_sync_to_async(_connection)()
    with pytest.raises(Exception):  # noqa: B017 — the database's own error type
        await database_sync_to_async(failing)()
    assert await database_sync_to_async(_connection)() is not first
    assert await database_sync_to_async(_count_query)() == 0


@pytest.mark.skipif(not settings.SERVICES_MODE, reason="a connection PostgreSQL dropped: services mode")
async def test_a_connection_postgresql_dropped_is_replaced_before_the_hop():
    def pid() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return cursor.fetchone()[0]

    def terminate(backend: int) -> None:
        from django.db import connections

        other = connections.create_connection("default")
        try:
            with other.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s)", [backend])
        finally:
            other.close()

    backend = await database_sync_to_async(pid)()
    await sync_to_async(terminate, thread_sensitive=False)(backend)  # another thread, another connection
    # The hop itself would fail on the dead connection; it is checked and replaced first.
    assert await database_sync_to_async(_count_query)() == 0
    assert await database_sync_to_async(pid)() != backend


async def test_inside_a_request_a_hop_closes_its_connection():
    # Django runs each request in its own thread-sensitive thread, which ends with the request:
    # a connection kept there would outlive it.
    async with ThreadSensitiveContext():
        assert await database_sync_to_async(_count_query)() == 0
        assert await database_sync_to_async(lambda: connection.connection)() is None
