"""`make run`'s demo: seeding twice keeps the login and the sessions; a taken port is refused up front."""

from __future__ import annotations

import json
import socket
import subprocess
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def var_dir(tmp_path, settings):
    settings.VAR_DIR = tmp_path
    return tmp_path


@pytest.mark.django_db
def test_seeding_again_keeps_the_login_and_signed_in_sessions(var_dir):
    call_command("seed_demo", stdout=StringIO())
    saved = json.loads((var_dir / "demo_credentials.json").read_text())
    assert saved["username"] == "admin@demo.local"
    browser = Client()
    assert browser.login(username=saved["username"], password=saved["password"])
    assert browser.get("/admin/").status_code == 200

    call_command("seed_demo", stdout=StringIO())

    assert json.loads((var_dir / "demo_credentials.json").read_text()) == saved
    # Same password and same hash: the session's auth hash still matches, nobody is signed out.
    assert browser.get("/admin/").status_code == 200
    assert get_user_model().objects.get(username=saved["username"]).check_password(saved["password"])


@pytest.mark.django_db
def test_seeding_without_a_saved_password_sets_a_new_one(var_dir):
    call_command("seed_demo", stdout=StringIO())
    (var_dir / "demo_credentials.json").unlink()
    call_command("seed_demo", stdout=StringIO())
    saved = json.loads((var_dir / "demo_credentials.json").read_text())
    assert get_user_model().objects.get(username="admin@demo.local").check_password(saved["password"])


def test_make_run_refuses_a_taken_port_before_migrating(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = subprocess.run(
            ["make", "-s", "-C", str(ROOT), "port-free", f"PORT={port}"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        taken.close()
    assert result.returncode != 0
    assert f"Port {port}" in result.stdout and "make run PORT=" in result.stdout
