"""Rate limits: per end user, per tenant (requests and tokens), per API key; across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from django.conf import settings

from conversations.models import Message
from tenants import ratelimits
from tenants.callers import Caller
from tenants.ratelimits import Check, Limits, RateLimited
from tests.conftest import adb

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Limited:
    """A caller with its limits, as these tests vary them together."""

    tenant_id: int
    end_user_rpm: int
    tenant_rpm: int
    tenant_tpm: int
    end_user_id: uuid.UUID | None = None
    api_key_id: int | None = None
    api_key_rpm: int | None = None

    def parts(self) -> tuple[Caller, Limits]:
        return (Caller(self.tenant_id, self.end_user_id, self.api_key_id),
                Limits(self.end_user_rpm, self.tenant_rpm, self.tenant_tpm, self.api_key_rpm))


def rate_limit_hit(*, caller: Limited, tokens: int = 0):
    who, limits = caller.parts()
    return ratelimits.rate_limit_hit(caller=who, limits=limits, tokens=tokens)


def checks_for(caller: Limited, **kwargs) -> list[Check]:
    return ratelimits.checks_for(*caller.parts(), **kwargs)


def _caller(**overrides) -> Limited:
    fields = {
        "tenant_id": 10_000 + uuid.uuid4().int % 1_000_000,
        "end_user_rpm": 5,
        "tenant_rpm": 100,
        "tenant_tpm": 1000,
        "end_user_id": uuid.uuid4(),
    }
    return Limited(**{**fields, **overrides})


def test_end_user_limit_refuses_with_retry_after():
    caller = _caller(end_user_rpm=3)
    for _ in range(3):
        rate_limit_hit(caller=caller)
    with pytest.raises(RateLimited) as refused:
        rate_limit_hit(caller=caller)
    assert refused.value.name == "requests per end user" and refused.value.limit == 3
    assert 1 <= refused.value.retry_after <= 60


def test_end_users_are_limited_separately_and_the_tenant_as_a_whole():
    base = _caller(end_user_rpm=2, tenant_rpm=5)
    for _ in range(2):
        rate_limit_hit(caller=base)
    other = Limited(**{**base.__dict__, "end_user_id": uuid.uuid4()})
    rate_limit_hit(caller=other)  # a different end user still has room
    third = Limited(**{**base.__dict__, "end_user_id": uuid.uuid4()})
    rate_limit_hit(caller=third)
    rate_limit_hit(caller=third)
    fourth = Limited(**{**base.__dict__, "end_user_id": uuid.uuid4()})
    with pytest.raises(RateLimited) as refused:
        rate_limit_hit(caller=fourth)
    assert refused.value.name == "requests per tenant"


def test_tenant_token_limit():
    caller = _caller(tenant_tpm=1000)
    rate_limit_hit(caller=caller, tokens=600)
    with pytest.raises(RateLimited) as refused:
        rate_limit_hit(caller=caller, tokens=600)
    assert refused.value.name == "tokens per tenant"


def test_api_key_limit_and_header_states():
    caller = _caller(end_user_id=None, api_key_id=7, api_key_rpm=2)
    states = rate_limit_hit(caller=caller)
    assert {s.name: s.remaining for s in states} == {"requests per tenant": 99, "requests per API key": 1}
    rate_limit_hit(caller=caller)
    with pytest.raises(RateLimited) as refused:
        rate_limit_hit(caller=caller)
    assert refused.value.name == "requests per API key"


@pytest.mark.django_db(transaction=True)
async def test_socket_gets_rate_limited_and_nothing_is_stored(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)(user_rpm=2)
    async with chat(await adb(setup.token)()) as socket:
        for _ in range(2):
            assert (await socket.turn("hi"))[-1]["type"] == "message.completed"
        await socket.send({"type": "message.create", "content": "one too many", "client_msg_id": "x"})
        error = await socket.receive()
    assert error["code"] == "rate_limited" and error["retry_after"] >= 1 and error["client_msg_id"] == "x"
    assert await adb(Message.objects.filter(content="one too many").exists)() is False
    assert sim.stats.requests == 2


_CHILD = """
import json, os, sys, uuid
import django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup()
from tenants.callers import Caller
from tenants.ratelimits import Limits, RateLimited, rate_limit_hit
spec = json.loads(sys.argv[1])
caller = Caller(spec["tenant_id"], uuid.UUID(spec["end_user_id"]))
limits = Limits(spec["end_user_rpm"], spec["tenant_rpm"], spec["tenant_tpm"])
admitted = 0
for _ in range(int(sys.argv[2])):
    try:
        rate_limit_hit(caller=caller, limits=limits)
        admitted += 1
    except RateLimited:
        pass
print(admitted)
"""


@pytest.mark.skipif(not settings.REDIS_URL, reason="a limit shared across processes needs Redis")
def test_limit_holds_across_processes_sharing_redis():
    caller = _caller(end_user_rpm=30, tenant_rpm=1000)
    spec = json.dumps({**caller.__dict__, "end_user_id": str(caller.end_user_id)})
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, spec, "25"], cwd=ROOT, env=os.environ.copy(),
            stdout=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]
    admitted_here = 0
    for _ in range(25):
        try:
            rate_limit_hit(caller=caller)
            admitted_here += 1
        except RateLimited:
            pass
    admitted = admitted_here + sum(int(child.communicate(timeout=60)[0].strip()) for child in children)
    assert admitted == 30  # 75 attempts from three processes, one shared limit of 30


def test_a_refused_request_counts_against_no_limit():
    from tenants.ratelimits import _limiter

    caller = _caller(end_user_rpm=1, tenant_rpm=100)
    rate_limit_hit(caller=caller)
    for _ in range(3):
        with pytest.raises(RateLimited):
            rate_limit_hit(caller=caller)
    # The end user was over their own limit: the tenant's counter saw only the admitted call.
    [tenant, _] = checks_for(caller)
    assert _limiter().get_window_stats(tenant.item, *tenant.identifiers).remaining == 99


async def test_the_event_loop_path_counts_the_counters_the_library_reads():
    """`rate_limits_acquire_async` (the /v1 path, one Redis script) and `rate_limit_hit` (the
    socket and REST paths, through `limits`) share one set of counters."""
    from tenants.ratelimits import _limiter, rate_limits_acquire_async

    caller = _caller(end_user_rpm=3, tenant_rpm=100, tenant_tpm=1000)
    await rate_limits_acquire_async(checks_for(caller, tokens=400))
    rate_limit_hit(caller=caller)
    states = {c.name: _limiter().get_window_stats(c.item, *c.identifiers).remaining for c in checks_for(caller, tokens=1)}
    assert states == {"requests per tenant": 98, "requests per end user": 1, "tokens per tenant": 600}
    await rate_limits_acquire_async(checks_for(caller))
    with pytest.raises(RateLimited) as refused:
        await rate_limits_acquire_async(checks_for(caller))
    assert refused.value.name == "requests per end user" and 1 <= refused.value.retry_after <= 60
    with pytest.raises(RateLimited) as refused:  # tokens: all or nothing too
        await rate_limits_acquire_async(checks_for(_caller(tenant_id=caller.tenant_id), tokens=700))
    assert refused.value.name == "tokens per tenant"
    assert _limiter().get_window_stats(checks_for(caller)[0].item, *checks_for(caller)[0].identifiers).remaining == 97


@pytest.mark.skipif(not settings.REDIS_URL, reason="only Redis reads other keys in the same round trip")
async def test_the_event_loop_path_reads_other_keys_in_the_same_round_trip():
    import redis

    from tenants.ratelimits import rate_limits_acquire_async

    redis.Redis.from_url(settings.REDIS_URL).set("parley-test:version", "v42")
    acquired = await rate_limits_acquire_async(checks_for(_caller()), also_read=("parley-test:version", "parley-test:none"))
    assert acquired.read == ("v42", "")


@pytest.mark.skipif(not settings.REDIS_URL, reason="a script cache is Redis's")
async def test_the_event_loop_path_loads_its_script_into_a_redis_that_forgot_it():
    import redis

    from tenants.ratelimits import rate_limits_acquire_async

    redis.Redis.from_url(settings.REDIS_URL).script_flush()  # as after a Redis restart
    acquired = await rate_limits_acquire_async(checks_for(_caller(end_user_rpm=5)), also_read=("parley-test:none",))
    assert acquired.read == ("",) and {s.name: s.remaining for s in acquired.states}["requests per end user"] == 4


# --- the chat path: sockets and REST admit a turn with every limit at once ----------------


def _chat_limits(setup, external_id: str = "user-1", api_key: bool = False):
    from conversations.admission import turn_config
    from tenants.models import ApiKey

    key_id = ApiKey.objects.get(tenant=setup.tenant).pk if api_key else None
    caller = Caller(tenant_id=setup.tenant.pk, end_user_id=setup.end_user(external_id).id, api_key_id=key_id)
    return Limited(**{**caller.__dict__, **turn_config(caller=caller).limits.__dict__})


def _remaining(limits) -> dict[str, int]:
    """What each of a caller's limits has left, read through the library (no counting)."""
    from tenants.ratelimits import _limiter

    return {c.name: _limiter().get_window_stats(c.item, *c.identifiers).remaining for c in checks_for(limits, tokens=1)}


def _use_up(limits, name: str, *, leave: int = 0) -> None:
    """Use up one of a caller's limits from outside the turn, leaving `leave`."""
    from tenants.ratelimits import rate_limits_acquire

    [check] = [c for c in checks_for(limits, tokens=1) if c.name == name]
    amount = _remaining(limits)[name] - leave
    rate_limits_acquire([Check(check.name, check.limit, check.identifiers, amount)])


@pytest.mark.django_db(transaction=True)
def test_a_rest_turn_refused_by_one_limit_counts_against_none(tenant_factory, sim):
    from rest_framework.test import APIClient

    setup = tenant_factory(user_rpm=5, tenant_tpm=5000)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {setup.api_key}")

    def refused(external_id: str, limit: str) -> None:
        conversation_id = client.post("/api/v1/conversations/", {"end_user": external_id}, format="json").json()["id"]
        limits = _chat_limits(setup, external_id, api_key=True)
        _use_up(limits, limit, leave=10 if limit.startswith("tokens") else 0)
        before = _remaining(limits)
        response = client.post(f"/api/v1/conversations/{conversation_id}/messages/", {"content": "hi"}, format="json")
        assert response.status_code == 429 and limit in response.json()["error"]["message"]
        assert _remaining(limits) == before  # the limits that had room counted nothing either
        assert not Message.objects.filter(conversation_id=conversation_id).exists()

    refused("by-tokens", "tokens per tenant")
    refused("by-requests", "requests per end user")
    assert sim.stats.requests == 0


@pytest.mark.django_db(transaction=True)
async def test_a_socket_turn_refused_by_the_token_limit_counts_no_request(tenant_factory, chat, sim):
    setup = await adb(tenant_factory)(user_rpm=5, tenant_tpm=5000)
    limits = await adb(_chat_limits)(setup)
    async with chat(await adb(setup.token)()) as socket:
        assert (await socket.turn("hi"))[-1]["type"] == "message.completed"
        await adb(_use_up)(limits, "tokens per tenant")
        before = await adb(_remaining)(limits)
        events = await socket.turn("one too many tokens", client_msg_id="t")
    assert events[-1]["code"] == "rate_limited" and "tokens" in events[-1]["message"]
    after = await adb(_remaining)(limits)
    assert after["requests per end user"] == before["requests per end user"] == 4
    assert after["requests per tenant"] == before["requests per tenant"]
    assert sim.stats.requests == 1


@pytest.mark.django_db(transaction=True)
def test_a_limit_refusal_does_not_wait_for_a_locked_conversation(tenant_factory):
    """Admission counts the limits before the turn locks its conversation: a turn over its
    limit is refused at once even while another transaction holds the conversation's row."""
    import threading
    import time

    from django.db import connection, transaction

    from conversations import services, turns
    from conversations.models import Conversation

    setup = tenant_factory(tenant_tpm=5000)
    end_user = setup.end_user()
    conversation = Conversation.objects.create(tenant=setup.tenant, assistant=setup.assistant, end_user=end_user)
    _use_up(_chat_limits(setup), "tokens per tenant")
    locked, release = threading.Event(), threading.Event()

    def hold_the_row() -> None:
        try:
            with transaction.atomic():
                Conversation.objects.select_for_update().get(pk=conversation.pk)
                Conversation.objects.filter(pk=conversation.pk).update(title="busy")
                locked.set()
                release.wait(timeout=8)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert locked.wait(timeout=5)
        started = time.monotonic()
        with pytest.raises(RateLimited) as refused:
            turns.turn_prepare(
                caller=services.Caller(tenant_id=setup.tenant.pk, end_user_id=end_user.id), content="hello",
                conversation_id=conversation.pk, assistant_slug=None, client_msg_id=None, control_channel="c",
            )
        assert refused.value.name == "tokens per tenant"
        assert time.monotonic() - started < 2
    finally:
        release.set()
        holder.join()


class _RedisTrips:
    """Counts the round trips to Redis that touch rate-limit counters (one send each)."""

    def __init__(self, monkeypatch) -> None:
        from redis.connection import AbstractConnection

        self.trips = 0
        send = AbstractConnection.send_packed_command

        def counting(connection, command, *args, **kwargs):
            packed = command if isinstance(command, bytes | str) else b"".join(bytes(part) for part in command)
            if b"parley-limits" in (packed.encode() if isinstance(packed, str) else packed):
                self.trips += 1
            return send(connection, command, *args, **kwargs)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)


@pytest.mark.skipif(not settings.REDIS_URL, reason="round trips to Redis need Redis")
@pytest.mark.django_db
def test_a_chat_turn_is_admitted_in_one_redis_round_trip(tenant_factory, monkeypatch):
    from conversations import services, turns

    setup = tenant_factory()
    caller = services.Caller(tenant_id=setup.tenant.pk, end_user_id=setup.end_user().id)

    def turn() -> None:
        turns.turn_prepare(
            caller=caller, content="hello", conversation_id=None, assistant_slug=None, client_msg_id=None,
            control_channel="c",
        )

    turn()  # the first one may also load the script into Redis
    counter = _RedisTrips(monkeypatch)
    turn()
    assert counter.trips == 1
