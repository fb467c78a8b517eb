"""Secrets stay secret: the provider key never leaves the server in admin pages, logs or frames,
is stored only as ciphertext, and survives key rotation; production settings pass `check --deploy`."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet, InvalidToken
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.urls import reverse

from tenants import crypto
from tenants.management.commands.rotate_encryption_keys import encrypted_fields
from tenants.models import ProviderCredential
from tenants.services import owner_add
from tests.conftest import adb
from tests.factories import PROVIDER_KEY

BASE_DIR = Path(__file__).resolve().parent.parent
LOUD_LOGGERS = (
    "", "openai", "httpx", "httpx2", "httpcore", "httpcore2", "django", "channels", "daphne", "asyncio", "llm",
)


def _raw_column(model, name: str) -> list[str]:
    table, column = model._meta.db_table, model._meta.get_field(name).column
    with connection.cursor() as cursor:
        cursor.execute(f'SELECT "{column}" FROM "{table}" WHERE "{column}" <> \'\'')  # noqa: S608 — our own names
        return [row[0] for row in cursor.fetchall()]


def _log_text(caplog: pytest.LogCaptureFixture) -> str:
    parts = [caplog.text]
    for record in caplog.records:
        parts += [record.getMessage(), repr(record.args), str(record.exc_info or ""), str(vars(record))]
    return "\n".join(parts)


def _admin_pages(*, tenant, conversation_id) -> list[str]:
    """Every admin page that shows a credential or a conversation, for an owner and a member."""
    from django.contrib.auth import get_user_model

    owner = owner_add(tenant=tenant, email=f"owner@{tenant.slug}.test", password="pw-for-the-test-1").user
    member = get_user_model().objects.create_user(username=f"member@{tenant.slug}.test", is_staff=True)
    tenant.memberships.create(user=member, role="member")
    credential = ProviderCredential.objects.get(tenant=tenant)
    urls = [
        reverse("admin:index"),
        reverse("admin:tenants_providercredential_changelist"),
        reverse("admin:tenants_providercredential_change", args=[credential.pk]),
        reverse("admin:tenants_providercredential_history", args=[credential.pk]),
        reverse("admin:tenants_providercredential_add"),
        reverse("admin:conversations_conversation_changelist"),
        reverse("admin:conversations_conversation_change", args=[conversation_id]),
        reverse("admin:conversations_assistant_changelist"),
        reverse("admin:billing_usage"),
        reverse("admin:billing_usagerecord_changelist"),
    ]
    pages = []
    for user in (owner, member):
        client = Client()
        client.force_login(user)
        pages += [client.get(url).content.decode() for url in urls]
    return pages


@pytest.mark.django_db(transaction=True)
async def test_provider_key_never_leaves_the_server_in_a_full_turn(tenant_factory, chat, sim, caplog):
    for name in LOUD_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name or None)
    setup = await adb(tenant_factory)()
    async with chat(await adb(setup.token)()) as socket:
        events = await socket.turn("Hello there, what do you know?")
        failed = await socket.turn("Again [[sim:status=401]]", conversation_id=events[0]["id"])

    assert events[-1]["type"] == "message.completed" and failed[-1]["type"] == "error"
    assert PROVIDER_KEY not in json.dumps(events + failed)
    assert caplog.records, "the test must see the log it checks"
    assert PROVIDER_KEY not in _log_text(caplog)

    pages = await adb(_admin_pages)(tenant=setup.tenant, conversation_id=events[0]["id"])
    assert all(PROVIDER_KEY not in page for page in pages)
    assert any("Hello there, what do you know?" in page for page in pages)  # the transcript rendered
    assert any("sk-…cdef" in page for page in pages)  # the mask is what is shown


@pytest.mark.django_db
def test_database_holds_only_ciphertext(tenant_factory):
    tenant_factory()
    stored = _raw_column(ProviderCredential, "api_key")
    assert stored and all(value.startswith("gAAAA") and PROVIDER_KEY not in value for value in stored)
    assert ProviderCredential.objects.get().api_key == PROVIDER_KEY


@pytest.mark.django_db
def test_changing_the_key_in_the_admin_logs_no_plaintext(tenant_factory, caplog):
    caplog.set_level(logging.DEBUG)
    setup = tenant_factory()
    owner = owner_add(tenant=setup.tenant, email="owner@rotate.test", password="pw-for-the-test-1").user
    credential = ProviderCredential.objects.get(tenant=setup.tenant)
    client = Client()
    client.force_login(owner)
    new_key = "sk-brand-new-secret-key-424242"
    data = {"name": credential.name, "base_url": credential.base_url, "organization": "", "new_api_key": new_key}
    client.post(reverse("admin:tenants_providercredential_change", args=[credential.pk]), data)
    history = client.get(reverse("admin:tenants_providercredential_history", args=[credential.pk])).content.decode()

    credential.refresh_from_db()
    assert credential.api_key == new_key
    assert new_key not in history and new_key not in _log_text(caplog)
    assert all(new_key not in value for value in _raw_column(ProviderCredential, "api_key"))


def _use_keys(settings, *keys: str) -> None:
    settings.FIELD_ENCRYPTION_KEYS = list(keys)
    crypto._fernet.cache_clear()


@pytest.mark.django_db
def test_rotation_keeps_every_secret_readable_under_the_new_key_alone(settings, tenant_factory):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    _use_keys(settings, old)
    setup = tenant_factory()
    ProviderCredential.objects.create(tenant=setup.tenant, name="second", api_key="sk-second-key-0000abcd")
    ProviderCredential.objects.create(tenant=setup.tenant, name="keyless", api_key="")
    before = {(model, name): _raw_column(model, name) for model, name in encrypted_fields()}

    _use_keys(settings, new, old)
    out = io.StringIO()
    call_command("rotate_encryption_keys", stdout=out)
    assert json.loads(out.getvalue()) == {"rotated": sum(len(values) for values in before.values())}

    _use_keys(settings, new)
    assert dict(ProviderCredential.objects.values_list("name", "api_key")) == {
        "default": PROVIDER_KEY, "second": "sk-second-key-0000abcd", "keyless": ""
    }
    for (model, name), old_values in before.items():
        after = _raw_column(model, name)
        assert len(after) == len(old_values) and not set(after) & set(old_values)
        for value in after:
            Fernet(new.encode()).decrypt(value.encode())
            with pytest.raises(InvalidToken):
                Fernet(old.encode()).decrypt(value.encode())
    crypto._fernet.cache_clear()


def _deploy_check(tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SECURE_", "DJANGO_"))}
    env.update(
        DEBUG="false",
        SECRET_KEY=secrets.token_urlsafe(50),
        FIELD_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
        ALLOWED_HOSTS="parley.example.com",
        PARLEY_VAR_DIR=str(tmp_path),
        **overrides,
    )
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120,
    )


def test_deploy_check_passes_with_production_settings(tmp_path):
    result = _deploy_check(tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "System check identified no issues" in result.stdout


def test_deploy_check_notices_a_weakened_setting(tmp_path):
    result = _deploy_check(tmp_path, SECURE_SSL_REDIRECT="false")
    assert result.returncode != 0 and "security.W008" in result.stderr + result.stdout


@pytest.mark.django_db(transaction=True)
async def test_json_log_lines_of_a_turn_carry_no_secret(tenant_factory, chat, sim):
    """The services-mode format (one JSON object per line, every record attribute a key)."""
    from tests.test_observability import _json_capture

    handler, stream = _json_capture()
    levels = {name: logging.getLogger(name or None).level for name in LOUD_LOGGERS}
    for name in LOUD_LOGGERS:
        logging.getLogger(name or None).setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    try:
        setup = await adb(tenant_factory)()
        token = await adb(setup.token)()
        async with chat(token) as socket:
            events = await socket.turn("Hello there, what do you know?")
            await socket.turn("Again [[sim:status=401]]", conversation_id=events[0]["id"])
        rest = await adb(lambda: Client().get("/api/v1/conversations/", headers={"Authorization": f"Bearer {setup.api_key}"}))()
    finally:
        logging.getLogger().removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name or None).setLevel(level)
    assert rest.status_code == 200
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any("usage booked" in line["message"] for line in lines), "the test must see the log it checks"
    text = stream.getvalue()
    assert all(secret not in text for secret in (PROVIDER_KEY, setup.api_key, token))
