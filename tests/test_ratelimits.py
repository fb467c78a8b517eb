"""Rate limits: per end user, per tenant (requests and tokens), per API key; across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from billing.ratelimits import Caller, RateLimited, rate_limit_hit
from conversations.models import Message
from tests.conftest import adb

ROOT = Path(__file__).resolve().parent.parent


def _caller(**overrides) -> Caller:
    fields = {
        "tenant_id": 10_000 + uuid.uuid4().int % 1_000_000,
        "end_user_rpm": 5,
        "tenant_rpm": 100,
        "tenant_tpm": 1000,
        "end_user_id": uuid.uuid4(),
    }
    return Caller(**{**fields, **overrides})


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
    other = Caller(**{**base.__dict__, "end_user_id": uuid.uuid4()})
    rate_limit_hit(caller=other)  # a different end user still has room
    third = Caller(**{**base.__dict__, "end_user_id": uuid.uuid4()})
    rate_limit_hit(caller=third)
    rate_limit_hit(caller=third)
    fourth = Caller(**{**base.__dict__, "end_user_id": uuid.uuid4()})
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
    states = rate_limit_hit(caller=caller, with_states=True)
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
from billing.ratelimits import Caller, RateLimited, rate_limit_hit
caller = Caller(**json.loads(sys.argv[1]))
admitted = 0
for _ in range(int(sys.argv[2])):
    try:
        rate_limit_hit(caller=caller)
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
