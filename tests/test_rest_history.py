"""History over REST: an integrator lists one end user's conversations (`?end_user=`), reads a
transcript newest first, and a signed-in tenant member reads their own with the session cookie."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from conversations.models import Conversation, Message
from tenants.models import EndUser
from tenants.services import member_end_user, owner_add

pytestmark = pytest.mark.django_db


def _api(api_key: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key}")
    return client


def _member(setup, email="member@example.test") -> APIClient:
    membership = owner_add(tenant=setup.tenant, email=email, password="pw-123456789")
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(membership.user)
    client.user_id = membership.user_id
    return client


def _conversation(setup, external_id: str, *, messages: int = 0) -> Conversation:
    end_user = setup.end_user(external_id)
    return _with_messages(setup, end_user, messages)


def _with_messages(setup, end_user: EndUser, messages: int) -> Conversation:
    conversation = Conversation.objects.create(tenant=setup.tenant, assistant=setup.assistant, end_user=end_user)
    for seq in range(1, messages + 1):
        Message.objects.create(
            tenant=setup.tenant, conversation=conversation, seq=seq,
            role="user" if seq % 2 else "assistant", content=f"m{seq}",
        )
    return conversation


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [row["id"] for row in response.json()["results"]]


def test_list_filters_by_an_end_users_external_id(tenant_factory):
    setup = tenant_factory()
    alice = [str(_conversation(setup, "alice").id) for _ in range(2)]
    _conversation(setup, "bob")
    client = _api(setup.api_key)
    assert _ids(client.get("/api/v1/conversations/", {"end_user": "alice"})) == alice[::-1]
    assert _ids(client.get("/api/v1/conversations/", {"end_user": "nobody"})) == []
    assert len(_ids(client.get("/api/v1/conversations/"))) == 3
    response = client.get("/api/v1/conversations/", {"end_user": "a\x00b"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"


def test_end_user_filter_never_reaches_another_tenant(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    _conversation(theirs, "alice")
    assert _ids(_api(ours.api_key).get("/api/v1/conversations/", {"end_user": "alice"})) == []


def test_messages_read_newest_first_with_pagination(tenant_factory):
    setup = tenant_factory()
    conversation = _conversation(setup, "alice", messages=5)
    client = _api(setup.api_key)
    path = f"/api/v1/conversations/{conversation.id}/messages/"
    first = client.get(path, {"order": "newest", "page_size": 2}).json()
    assert [m["seq"] for m in first["results"]] == [5, 4]
    second = client.get(first["next"]).json()
    assert [m["seq"] for m in second["results"]] == [3, 2]
    assert [m["seq"] for m in client.get(path).json()["results"]] == [1, 2, 3, 4, 5]
    assert [m["seq"] for m in client.get(path, {"order": "oldest"}).json()["results"]] == [1, 2, 3, 4, 5]
    refused = client.get(path, {"order": "sideways"})
    assert refused.status_code == 400 and "order" in refused.json()["error"]["fields"]


def test_a_member_session_reads_only_its_own_conversations(tenant_factory):
    setup = tenant_factory()
    client = _member(setup)
    own = _with_messages(setup, member_end_user(tenant=setup.tenant, user_id=client.user_id), 3)
    other = _conversation(setup, "alice", messages=2)
    assert _ids(client.get("/api/v1/conversations/")) == [str(own.id)]
    assert client.get(f"/api/v1/conversations/{own.id}/").json()["id"] == str(own.id)
    newest = client.get(f"/api/v1/conversations/{own.id}/messages/", {"order": "newest"}).json()
    assert [m["content"] for m in newest["results"]] == ["m3", "m2", "m1"]
    for path in (f"/api/v1/conversations/{other.id}/", f"/api/v1/conversations/{other.id}/messages/"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert _ids(client.get("/api/v1/conversations/", {"end_user": "alice"})) == []


def test_a_member_session_cannot_write(tenant_factory):
    setup = tenant_factory()
    client = _member(setup)
    own = _with_messages(setup, member_end_user(tenant=setup.tenant, user_id=client.user_id), 1)
    for method, path, body in (
        ("post", "/api/v1/conversations/", {}),
        ("delete", f"/api/v1/conversations/{own.id}/", None),
        ("post", f"/api/v1/conversations/{own.id}/messages/", {"content": "hi"}),
        ("post", "/api/v1/end-users/x/token/", {}),
    ):
        response = getattr(client, method)(path, body, format="json")
        assert response.status_code == 401, (method, path, response.content)
    assert Conversation.objects.filter(id=own.id).exists()
    assert client.get("/api/v1/usage/").status_code == 401  # the tenant's figures: a key's


def test_a_member_session_of_another_tenant_reads_nothing_here(tenant_factory):
    ours, theirs = tenant_factory(), tenant_factory()
    client = _member(theirs, email="them@example.test")
    mine = _conversation(ours, "alice")
    assert _ids(client.get("/api/v1/conversations/")) == []
    assert client.get(f"/api/v1/conversations/{mine.id}/").status_code == 404
    # Naming a tenant it is not a member of: not authenticated.
    assert client.get("/api/v1/conversations/", {"tenant": ours.tenant.slug}).status_code == 401


def test_a_blocked_member_reads_nothing(tenant_factory):
    setup = tenant_factory()
    client = _member(setup)
    EndUser.objects.filter(pk=member_end_user(tenant=setup.tenant, user_id=client.user_id).pk).update(is_blocked=True)
    response = client.get("/api/v1/conversations/")
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
