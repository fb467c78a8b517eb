"""Repeated failed sign-ins are throttled per username and per address."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner(settings):
    settings.LOGIN_FAILURES_ALLOWED = 3
    return get_user_model().objects.create_user("owner@acme.test", password="right-password-123", is_staff=True)


def _login(client, password, username="owner@acme.test", address="10.1.1.1"):
    return client.post(
        "/admin/login/?next=/admin/", {"username": username, "password": password}, REMOTE_ADDR=address
    )


def test_the_right_password_is_refused_after_too_many_failures(client, owner):
    for _ in range(3):
        assert _login(client, "wrong").status_code == 200  # the form again, with its error
    refused = _login(client, "right-password-123")
    assert refused.status_code == 200 and "_auth_user_id" not in client.session


def test_failures_from_one_address_throttle_other_usernames_too(client, owner):
    for i in range(3):
        _login(client, "wrong", username=f"guess{i}@acme.test", address="10.9.9.9")
    assert "_auth_user_id" not in client.session
    _login(client, "right-password-123", address="10.9.9.9")
    assert "_auth_user_id" not in client.session


def test_a_few_failures_do_not_lock_the_owner_out(client, owner):
    for _ in range(2):
        _login(client, "wrong")
    assert _login(client, "right-password-123").status_code == 302
    assert client.session["_auth_user_id"] == str(owner.pk)
