"""The tool registry, argument validation, concurrent execution and the built-in tools."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from channels.db import database_sync_to_async
from django.core.exceptions import ValidationError

from tools import registry
from tools.calls import ToolCallRequest, ToolContext, ToolError
from tools.execution import MAX_CALLS_PER_TURN, tool_calls_execute
from tools.registry import BUILTINS, Tool, builtin, handler_run, tool_definitions
from tools.services import webhook_secret_rotate, webhook_tool_create, webhook_tool_update

CONTEXT = ToolContext(conversation_id=None, end_user_external_id="user-1", tenant_id=1)

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer"},
        "status": {"type": "string", "enum": ["open", "closed"]},
        "note": {"type": "object", "properties": {"text": {"type": "string"}}},
    },
    "required": ["order_id"],
}


class Counter:
    """A test double: a tool that counts its runs and answers after `delay` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.runs: list[dict] = []
        self.delay = delay
        self.running = self.most_running = 0  # runs in flight at once: now, and the most seen

    async def __call__(self, **arguments):
        self.runs.append(arguments)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.running -= 1
        return {"seen": arguments}


def register(monkeypatch, name: str, handler, *, parameters=ORDER_SCHEMA, timeout: float = 5.0) -> Tool:
    """Register a built-in for this test only."""
    tool = Tool(name=name, description=f"{name} for tests", parameters=parameters, run=handler_run(handler),
                timeout_seconds=timeout)
    monkeypatch.setitem(BUILTINS, name, tool)
    return tool


async def execute(*calls: tuple[str, str], names: list[str], tenant_id: int = 1):
    requests = [ToolCallRequest(f"call_{i}", name, arguments) for i, (name, arguments) in enumerate(calls)]
    return await tool_calls_execute(tenant_id=tenant_id, calls=requests, context=CONTEXT, names=names)


# --- definitions ----------------------------------------------------------------------------


@pytest.fixture
def tenant(tenant_factory):
    return tenant_factory().tenant


def test_definitions_are_sorted_by_name_and_byte_stable(tenant, django_assert_num_queries):
    webhook_tool_create(tenant=tenant, name="zeta_lookup", url="https://hooks.example.com/z",
                        parameters={"type": "object", "required": ["q"], "properties": {"q": {"type": "string"}}})
    webhook_tool_create(tenant=tenant, name="alpha-lookup", url="https://hooks.example.com/a", description="A.")
    names = ["zeta_lookup", "current_time", "alpha-lookup", "calculator", "current_time"]

    with django_assert_num_queries(1):
        first = tool_definitions(tenant_id=tenant.pk, names=names)
    again = tool_definitions(tenant_id=tenant.pk, names=list(reversed(names)))

    assert [d["function"]["name"] for d in first] == ["alpha-lookup", "calculator", "current_time", "zeta_lookup"]
    assert json.dumps(first) == json.dumps(again)
    zeta = first[-1]
    assert list(zeta) == ["type", "function"]
    assert list(zeta["function"]) == ["name", "description", "parameters"]
    # Schema keys sorted, and strictness made explicit for the model too.
    assert list(zeta["function"]["parameters"]) == ["additionalProperties", "properties", "required", "type"]
    assert zeta["function"]["parameters"]["additionalProperties"] is False


def test_definitions_skip_unknown_inactive_and_other_tenants_tools(tenant, tenant_factory, caplog):
    other = tenant_factory().tenant
    webhook_tool_create(tenant=other, name="theirs", url="https://hooks.example.com/t")
    webhook_tool_create(tenant=tenant, name="paused", url="https://hooks.example.com/p", is_active=False)

    with caplog.at_level(logging.WARNING, logger="tools.registry"):
        definitions = tool_definitions(tenant_id=tenant.pk, names=["calculator", "theirs", "paused", "ghost"])

    assert [d["function"]["name"] for d in definitions] == ["calculator"]
    assert "ghost, paused, theirs" in caplog.text


def test_builtin_definitions_need_no_query(django_assert_num_queries, db):
    with django_assert_num_queries(0):
        definitions = tool_definitions(tenant_id=1, names=["calculator"])
    assert definitions[0]["function"]["parameters"]["required"] == ["expression"]


def test_a_strict_tool_says_so(monkeypatch):
    tool = Tool(name="strict_one", description="", parameters={"type": "object", "properties": {}},
                run=handler_run(lambda: 1), strict=True)
    assert tool.definition()["function"]["strict"] is True


def test_builtins_refuse_bad_names_schemas_and_duplicates(monkeypatch):
    monkeypatch.setattr(registry, "BUILTINS", dict(BUILTINS))
    with pytest.raises(ValueError, match="invalid tool name"):
        builtin(name="has space", description="", parameters={"type": "object"})(lambda: 1)
    with pytest.raises(Exception, match="type"):
        builtin(name="listy", description="", parameters={"type": "array"})(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        builtin(name="calculator", description="", parameters={"type": "object"})(lambda: 1)


# --- validation: bad calls are answered without running -------------------------------------


@pytest.mark.parametrize(
    "arguments, complaint",
    [
        ('{"order_id": 1, "colour": "red"}', "unknown argument 'colour' (allowed: note, order_id, status)"),
        ('{"order_id": 1, "note": {"text": "x", "by": "me"}}', "unknown argument 'note.by' (allowed: text)"),
        ('{"status": "open"}', "missing required argument 'order_id'"),
        ('{"order_id": "abc"}', "argument 'order_id': 'abc' is not of type 'integer'"),
        ('{"order_id": 1, "status": "lost"}', "argument 'status': 'lost' is not one of ['open', 'closed']"),
        ('{"order_id": 1,', "arguments are not valid JSON: Expecting property name enclosed in double quotes"),
        ("[1, 2]", "arguments must be a JSON object, not an array"),
    ],
)
async def test_invalid_arguments_are_answered_without_running_the_tool(monkeypatch, arguments, complaint):
    counter = Counter()
    register(monkeypatch, "order_status", counter)

    [outcome] = await execute(("order_status", arguments), names=["order_status"])

    assert counter.runs == []
    assert not outcome.ok
    assert outcome.error.startswith("invalid arguments for tool 'order_status', the call was not run: ")
    assert complaint in outcome.error
    assert json.loads(outcome.content) == {"error": outcome.error}
    assert outcome.call_id == "call_0" and outcome.name == "order_status"


async def test_every_complaint_is_reported_at_once(monkeypatch):
    register(monkeypatch, "order_status", Counter())

    [outcome] = await execute(("order_status", '{"status": 3, "extra": 1}'), names=["order_status"])

    assert "missing required argument 'order_id'" in outcome.error
    assert "unknown argument 'extra'" in outcome.error
    assert "argument 'status': 3 is not of type 'string'" in outcome.error
    assert outcome.arguments == {"status": 3, "extra": 1}


async def test_an_unknown_tool_is_answered_with_the_available_ones(monkeypatch):
    counter = Counter()
    register(monkeypatch, "order_status", counter)

    [outcome] = await execute(("order_stats", '{"order_id": 1}'), names=["order_status", "calculator"])

    assert not outcome.ok
    assert outcome.error == "there is no tool named 'order_stats'; available tools: calculator, order_status"
    assert counter.runs == []


async def test_a_tool_that_is_not_enabled_does_not_run(monkeypatch):
    counter = Counter()
    register(monkeypatch, "order_status", counter)

    [outcome] = await execute(("order_status", '{"order_id": 1}'), names=["calculator"])

    assert not outcome.ok
    assert "no tool named 'order_status'" in outcome.error
    assert counter.runs == []


async def test_another_tenants_webhook_tool_is_unknown(tenant_factory, transactional_db):
    theirs = await database_sync_to_async(tenant_factory)()
    mine = await database_sync_to_async(tenant_factory)()
    await database_sync_to_async(webhook_tool_create)(tenant=theirs.tenant, name="refund", url="https://hooks.example.com/r")

    [outcome] = await execute(("refund", "{}"), names=["refund"], tenant_id=mine.tenant.pk)

    assert not outcome.ok
    assert outcome.error == "there is no tool named 'refund'; available tools: none"


async def test_a_valid_call_runs_and_its_result_is_json(monkeypatch):
    counter = Counter()
    register(monkeypatch, "order_status", counter)

    [outcome] = await execute(("order_status", '{"order_id": 7, "status": "open"}'), names=["order_status"])

    assert outcome.ok and outcome.error is None
    assert counter.runs == [{"order_id": 7, "status": "open"}]
    assert outcome.arguments == {"order_id": 7, "status": "open"}
    assert json.loads(outcome.content) == {"seen": {"order_id": 7, "status": "open"}}


async def test_outcomes_follow_the_calls_order_whatever_finishes_first(monkeypatch):
    register(monkeypatch, "slow", Counter(delay=0.1))
    register(monkeypatch, "fast", Counter())

    outcomes = await execute(
        ("slow", '{"order_id": 1}'), ("nope", "{}"), ("fast", '{"order_id": 2}'), ("fast", "{"),
        names=["slow", "fast"],
    )

    assert [(o.call_id, o.ok) for o in outcomes] == [("call_0", True), ("call_1", False), ("call_2", True),
                                                      ("call_3", False)]


async def test_no_calls_no_work():
    assert await tool_calls_execute(tenant_id=1, calls=[], context=CONTEXT, names=["calculator"]) == []


async def test_too_many_calls_in_one_turn_are_refused(monkeypatch):
    counter = Counter()
    register(monkeypatch, "order_status", counter)

    outcomes = await execute(*[("order_status", '{"order_id": 1}')] * (MAX_CALLS_PER_TURN + 2), names=["order_status"])

    assert [o.ok for o in outcomes].count(True) == MAX_CALLS_PER_TURN
    assert "too many tool calls" in outcomes[-1].error
    assert len(counter.runs) == MAX_CALLS_PER_TURN


# --- execution: concurrency, timeouts, failures ---------------------------------------------


async def test_two_slow_calls_run_concurrently(monkeypatch):
    counter = Counter(delay=0.3)
    register(monkeypatch, "order_status", counter)

    started = time.monotonic()
    outcomes = await execute(("order_status", '{"order_id": 1}'), ("order_status", '{"order_id": 2}'),
                             names=["order_status"])
    elapsed = time.monotonic() - started

    assert all(o.ok for o in outcomes)
    assert counter.most_running == 2  # both in flight at once, whatever the machine's load
    assert elapsed >= 0.3


async def test_a_tool_past_its_timeout_is_a_tool_error(monkeypatch):
    register(monkeypatch, "order_status", Counter(delay=5), timeout=0.1)

    started = time.monotonic()
    [outcome] = await execute(("order_status", '{"order_id": 1}'), names=["order_status"])

    assert time.monotonic() - started < 1
    assert not outcome.ok
    assert outcome.error == "the tool did not finish within 0.1 s"
    assert outcome.arguments == {"order_id": 1}


async def test_a_crashing_tool_is_a_tool_error_that_keeps_its_internals(monkeypatch, caplog):
    def crash(**arguments):
        raise RuntimeError("db password is hunter2")

    register(monkeypatch, "order_status", crash)

    [outcome] = await execute(("order_status", '{"order_id": 1}'), names=["order_status"])

    assert not outcome.ok
    assert outcome.error == "the tool failed unexpectedly"
    assert "hunter2" not in outcome.content
    assert "hunter2" in caplog.text  # logged for the operator, with the traceback


async def test_a_tool_error_reaches_the_model_as_written(monkeypatch):
    def refuse(**arguments):
        raise ToolError("order 1 belongs to someone else")

    register(monkeypatch, "order_status", refuse)

    [outcome] = await execute(("order_status", '{"order_id": 1}'), names=["order_status"])

    assert outcome.content == '{"error":"order 1 belongs to someone else"}'


async def test_a_result_that_is_not_json_is_a_tool_error(monkeypatch):
    register(monkeypatch, "order_status", lambda **arguments: {"when": datetime.now()})

    [outcome] = await execute(("order_status", '{"order_id": 1}'), names=["order_status"])

    assert not outcome.ok
    assert outcome.error == "the tool returned a result that is not JSON"


async def test_a_handler_may_ask_for_the_context(monkeypatch):
    def whoami(*, context: ToolContext):
        return {"end_user": context.end_user_external_id}

    register(monkeypatch, "whoami", whoami, parameters={"type": "object", "properties": {}})

    [outcome] = await execute(("whoami", ""), names=["whoami"])

    assert outcome.ok and json.loads(outcome.content) == {"end_user": "user-1"}


# --- calculator -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, result",
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("(-2) ** 2", 4),
        ("--3", 3),
        ("+5 - -5", 10),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("2 ** -1", 0.5),
        ("1.5e3 + 0.5", 1500.5),
        ("10 ** 100", 10**100),
    ],
)
async def test_calculator_does_arithmetic(expression, result):
    [outcome] = await execute(("calculator", json.dumps({"expression": expression})), names=["calculator"])

    assert outcome.ok, outcome.error
    assert json.loads(outcome.content) == {"expression": expression, "result": result}


@pytest.mark.parametrize(
    "expression, complaint",
    [
        ("1 / 0", "division by zero"),
        ("1 // 0", "division by zero"),
        ("1 % 0", "division by zero"),
        ("0 ** -1", "division by zero"),
        ("9 ** 9 ** 9", "the result is too large"),
        ("2 ** 100000", "the result is too large"),
        ("10.0 ** 400", "the result is too large"),
        ("1e999", "the result is too large"),
        ("2.0 ** 100000", "the exponent is too large"),
        ("(-8) ** 0.5", "the result is not a real number"),
        ("x + 1", "'x' is not allowed"),
        ("(1).real", "'1 .real' is not allowed"),
        ("abs(-1)", "'abs(-1)' is not allowed"),
        ("__import__('os').system('id')", "is not allowed"),
        ("(lambda: 1)()", "is not allowed"),
        ("[1, 2]", "is not allowed"),
        ("1 < 2", "is not allowed"),
        ("'a' * 3", "'a' is not a number"),
        ("True + 1", "True is not a number"),
        ("1j", "1j is not a number"),
        ("2 +", "the expression is not valid arithmetic"),
        ("1 + " * 200 + "1", "longer than 500 characters"),
    ],
)
async def test_calculator_refuses(expression, complaint):
    [outcome] = await execute(("calculator", json.dumps({"expression": expression})), names=["calculator"])

    assert not outcome.ok
    assert complaint in outcome.error


# --- current_time ---------------------------------------------------------------------------


async def test_current_time_defaults_to_utc():
    [outcome] = await execute(("current_time", "{}"), names=["current_time"])

    answer = json.loads(outcome.content)
    assert answer["timezone"] == "UTC" and answer["utc_offset"] == "+00:00"
    assert abs(datetime.fromisoformat(answer["datetime"]).timestamp() - time.time()) < 5


async def test_current_time_in_a_named_zone():
    [outcome] = await execute(("current_time", '{"timezone": "asia/kolkata"}'), names=["current_time"])

    answer = json.loads(outcome.content)
    assert answer["timezone"] == "Asia/Kolkata" and answer["utc_offset"] == "+05:30"
    moment = datetime.fromisoformat(answer["datetime"])
    assert moment.utcoffset() == datetime.now(ZoneInfo("Asia/Kolkata")).utcoffset()
    assert answer["weekday"] == moment.strftime("%A")


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "", "EST5EDT/../UTC"])
async def test_current_time_refuses_an_unknown_zone(zone):
    [outcome] = await execute(("current_time", json.dumps({"timezone": zone})), names=["current_time"])

    assert not outcome.ok
    assert outcome.error.startswith("unknown time zone")
    assert "IANA" in outcome.error


# --- webhook tool definitions ---------------------------------------------------------------


def test_a_webhook_tool_gets_a_secret_when_none_is_given(tenant):
    tool = webhook_tool_create(tenant=tenant, name="lookup", url="https://hooks.example.com/l")
    given = webhook_tool_create(tenant=tenant, name="lookup2", url="https://hooks.example.com/l", secret="s3cret-value")

    assert tool.secret.startswith("whsec_") and len(tool.secret) > 40
    assert given.secret == "s3cret-value"
    old = tool.secret
    rotated = webhook_secret_rotate(tool=tool)
    assert rotated.startswith("whsec_") and rotated != old
    assert type(tool).objects.get(pk=tool.pk).secret == rotated


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"name": "has space"}, "name", "letters, digits"),
        ({"name": "x" * 65}, "name", ""),
        ({"name": "calculator"}, "name", "built-in"),
        ({"parameters": {"type": "array"}}, "parameters", '"type": "object"'),
        ({"parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "parameters", "invalid JSON Schema"),
        ({"parameters": "nope"}, "parameters", "must be a JSON object"),
        ({"url": "ftp://hooks.example.com/x"}, "url", ""),
        ({"url": "http://hooks.example.com/x"}, "url", "must use https"),
        ({"url": "https://user:pw@hooks.example.com/x"}, "url", "credentials"),
        ({"timeout_seconds": 31}, "timeout_seconds", ""),
        ({"timeout_seconds": 0}, "timeout_seconds", ""),
    ],
)
def test_a_webhook_tool_definition_is_validated(tenant, settings, fields, field, message):
    settings.DEBUG = False
    arguments = {"tenant": tenant, "name": "lookup", "url": "https://hooks.example.com/l", **fields}

    with pytest.raises(ValidationError) as caught:
        webhook_tool_create(**arguments)

    assert field in caught.value.message_dict
    assert message in " ".join(caught.value.message_dict[field])


def test_webhook_tool_names_are_unique_per_tenant_only(tenant, tenant_factory):
    webhook_tool_create(tenant=tenant, name="lookup", url="https://hooks.example.com/l")
    webhook_tool_create(tenant=tenant_factory().tenant, name="lookup", url="https://hooks.example.com/l")

    with pytest.raises(ValidationError):
        webhook_tool_create(tenant=tenant, name="lookup", url="https://hooks.example.com/other")


def test_a_webhook_tool_update_is_validated_too(tenant):
    tool = webhook_tool_create(tenant=tenant, name="lookup", url="https://hooks.example.com/l")

    webhook_tool_update(tool=tool, description="Finds things.", timeout_seconds=20)
    with pytest.raises(ValidationError):
        webhook_tool_update(tool=tool, parameters={"type": "object", "required": "q"})
    with pytest.raises(TypeError):
        webhook_tool_update(tool=tool, secret="")

    tool.refresh_from_db()
    assert (tool.description, tool.timeout_seconds) == ("Finds things.", 20)
    assert tool.parameters == {"type": "object", "properties": {}}


# --- misconfiguration is still a tool error -------------------------------------------------


async def test_a_broken_schema_stored_around_the_services_is_a_tool_error(tenant_factory, transactional_db):
    from tools.models import WebhookTool

    setup = await database_sync_to_async(tenant_factory)()
    tool = await database_sync_to_async(webhook_tool_create)(
        tenant=setup.tenant, name="lookup", url="https://hooks.example.com/l"
    )
    broken = {"type": "object", "properties": {"q": {"type": "strin"}}}
    await WebhookTool.objects.filter(pk=tool.pk).aupdate(parameters=broken)

    [outcome] = await execute(("lookup", '{"q": "x"}'), names=["lookup"], tenant_id=setup.tenant.pk)

    assert not outcome.ok
    assert outcome.error == "tool 'lookup' is misconfigured and cannot be called"


async def test_an_unreadable_webhook_secret_fails_the_calls_not_the_turn(tenant_factory, transactional_db, settings):
    from cryptography.fernet import Fernet

    setup = await database_sync_to_async(tenant_factory)()
    await database_sync_to_async(webhook_tool_create)(tenant=setup.tenant, name="lookup", url="https://hooks.example.com/l")
    settings.FIELD_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]  # a rotation gone wrong

    outcomes = await execute(("lookup", "{}"), ("calculator", '{"expression": "1+1"}'),
                             names=["lookup", "calculator"], tenant_id=setup.tenant.pk)

    assert [o.ok for o in outcomes] == [False, True]
    assert outcomes[0].error == "tool 'lookup' is unavailable right now; try again later"


def test_a_webhook_tool_may_not_take_a_builtin_name_even_one_registered_later(monkeypatch):
    from tools.models import tool_name_validator

    with pytest.raises(ValidationError, match="built-in tool's name"):
        tool_name_validator("calculator")
    tool_name_validator("my_lookup")
    monkeypatch.setattr(registry, "BUILTINS", dict(BUILTINS))
    builtin(name="my_lookup", description="", parameters={"type": "object"})(lambda: 1)
    with pytest.raises(ValidationError, match="built-in tool's name"):
        tool_name_validator("my_lookup")
