"""The tenant-scoped admin: every registered ModelAdmin keeps tenant B out of tenant A's sight,
roles come from Membership, and the admin's own screens (API keys, end users, credentials, usage)."""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.contenttypes.models import ContentType
from django.contrib.messages import get_messages
from django.db import models
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from batches.models import Batch, File
from billing.caps import Subject, cap_reserve, cap_settle
from billing.models import CapAlert, ModelPrice, Reservation, SpendingCap, TenantModelPrice, UsageRecord
from billing.services import UsageInput, price_for, usage_record
from conversations.models import Assistant, Conversation, Message
from moderation.models import ModerationEvent, ModerationPolicy
from responsecache.models import CachedAnswer
from routing.models import ModelAlias
from tenants.admin_base import TenantScopedAdmin
from tenants.models import ApiKey, AuditEntry, EndUser, Membership, ProviderCredential, Tenant
from tenants.services import (
    InvalidApiKey,
    InvalidEndUserToken,
    api_key_authenticate,
    end_user_token_issue,
    end_user_token_verify,
    owner_add,
)
from tests.factories import PROVIDER_KEY
from tools.models import WebhookTool

pytestmark = pytest.mark.django_db

User = get_user_model()
PASSWORD = "a-long-test-password-1"
# Registered admins of models that belong to no tenant: nobody but superusers edits them.
GLOBAL_ADMINS = {ModelPrice, User, Group}


@pytest.fixture(autouse=True)
def _fast_passwords(settings) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@dataclass
class TenantWorld:
    """One tenant with one object of every registered tenant-owned model."""

    tenant: Tenant
    objects: dict[type[models.Model], models.Model] = field(default_factory=dict)

    def __getitem__(self, model: type[models.Model]) -> Any:
        return self.objects[model]


@dataclass
class World:
    a: TenantWorld
    b: TenantWorld
    owner: Any
    admin: Any
    member: Any


def _staff(email: str, tenant: Tenant, role: str) -> Any:
    user = User.objects.create_user(username=email, email=email, password=PASSWORD, is_staff=True)
    Membership.objects.create(tenant=tenant, user=user, role=role)
    return user


def _populate(setup: Any, label: str, model_name: str) -> TenantWorld:
    tenant = setup.tenant
    world = TenantWorld(tenant=tenant)
    credential = ProviderCredential.objects.get(tenant=tenant)
    api_key = ApiKey.objects.get(tenant=tenant)
    ApiKey.objects.filter(pk=api_key.pk).update(name=f"{label}-key")
    customer = setup.end_user(f"{label}-customer")
    assistant = Assistant.objects.create(
        tenant=tenant, slug=f"{label}-helper", name=f"{label.title()} Helper", credential=credential
    )
    conversation = Conversation.objects.create(
        tenant=tenant, assistant=assistant, end_user=customer, title=f"{label} chat", last_seq=2
    )
    Message.objects.create(tenant=tenant, conversation=conversation, seq=1, role="user", content=f"hello from {label}")
    answer = Message.objects.create(
        tenant=tenant, conversation=conversation, seq=2, role="assistant", content=f"{label} answer",
        tool_calls=[{"id": "call_1", "type": "function", "function": {"name": "clock", "arguments": "{}"}}],
        tokens=7, model=model_name,
    )
    cap = SpendingCap.objects.create(
        tenant=tenant, scope=SpendingCap.Scope.END_USER, end_user=customer, limit_usd=Decimal("1"),
        alert_thresholds=[50],
    )
    subject = Subject(tenant_id=tenant.pk, end_user_id=customer.pk)
    reservation = cap_reserve(subject=subject, amount=Decimal("0.8"), call_id=f"{label}-call-1")
    cap_settle(reservation=reservation, actual=Decimal("0.6"))
    record = usage_record(
        usage=UsageInput(
            call_id=f"{label}-call-1", tenant_id=tenant.pk, model=model_name, prompt_tokens=1000,
            completion_tokens=500, end_user_id=customer.pk, conversation_id=conversation.id, message_id=answer.id,
        ),
        price=price_for(model_name),
    )
    owner = owner_add(tenant=tenant, email=f"owner@{label}.test", password=PASSWORD)
    tool = WebhookTool.objects.create(tenant=tenant, name=f"{label}-lookup", url=f"https://{label}.example.com/hook")
    policy = ModerationPolicy.objects.create(tenant=tenant, blocked_terms=[f"{label}-term"])
    event = ModerationEvent.objects.create(
        tenant=tenant, direction="input", source="rules", categories=["blocked_term"], matched=f"{label}-term",
        action="block", excerpt=f"a message from {label}",
    )
    audit = AuditEntry.objects.create(tenant=tenant, action="admin.change", object_repr=f"{label} thing")
    own_price = TenantModelPrice.objects.create(
        tenant=tenant, model=f"{label}-llm", input_per_million=0, cached_input_per_million=0, output_per_million=0,
        batch_input_per_million=0, batch_output_per_million=0,
    )
    alias = ModelAlias.objects.create(tenant=tenant, name=f"{label}-auto", default_model=model_name)
    upload = File.objects.create(tenant=tenant, purpose="batch", filename=f"{label}.jsonl", bytes=2, content=b"{}")
    batch = Batch.objects.create(tenant=tenant, api_key=api_key, input_file=upload, total=1,
                                 expires_at=answer.created_at, metadata={"label": label})
    cached = CachedAnswer.objects.create(
        tenant=tenant, assistant_id=assistant.pk, scope=f"a{assistant.pk}.v", kind="exact", key=f"{label}-key",
        question=f"{label} faq", answer="an answer", model=model_name, expires_at=timezone.now() + timedelta(hours=1),
    )
    world.objects = {
        Tenant: tenant, Membership: owner, EndUser: customer, ProviderCredential: credential,
        ApiKey: ApiKey.objects.get(pk=api_key.pk), Assistant: assistant, Conversation: conversation,
        SpendingCap: cap, CapAlert: CapAlert.objects.get(cap=cap),
        Reservation: Reservation.objects.get(pk=reservation.pk),
        UsageRecord: record, WebhookTool: tool, ModerationPolicy: policy, ModerationEvent: event,
        AuditEntry: audit, TenantModelPrice: own_price, ModelAlias: alias, Batch: batch, CachedAnswer: cached,
    }
    return world


@pytest.fixture
def world(tenant_factory) -> World:
    a = _populate(tenant_factory(slug="alpha", monthly_cap_usd=Decimal("5")), "alpha", "gpt-4o-mini")
    b = _populate(tenant_factory(slug="bravo", monthly_cap_usd=Decimal("5")), "bravo", "gpt-3.5-turbo")
    return World(
        a=a,
        b=b,
        owner=a[Membership].user,
        admin=_staff("admin@alpha.test", a.tenant, Membership.Role.ADMIN),
        member=_staff("member@alpha.test", a.tenant, Membership.Role.MEMBER),
    )


def _client(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _url(model: type[models.Model], view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def _scoped_admins() -> list[tuple[type[models.Model], TenantScopedAdmin]]:
    return [(m, a) for m, a in admin.site._registry.items() if isinstance(a, TenantScopedAdmin)]


def _missing_pk(model: type[models.Model]) -> Any:
    if isinstance(model._meta.pk, models.UUIDField):
        return uuid.uuid4()
    return (model._default_manager.order_by("-pk").values_list("pk", flat=True).first() or 0) + 10**6


def _outcome(response: Any, pk: Any) -> tuple:
    """What a response tells the user, with the object's id blanked out."""
    notes = [str(m.message).replace(str(pk), "<id>") for m in get_messages(response.wsgi_request)]
    return response.status_code, response.get("Location"), notes


def _result_pks(response: Any) -> set:
    assert response.status_code == 200, response
    return {obj.pk for obj in response.context["cl"].result_list}


def _form_defaults(client: Client, url: str, **overrides: Any) -> dict[str, Any]:
    """The POST an admin add form would send untouched, with some fields changed."""
    form = client.get(url).context["adminform"].form
    data: dict[str, Any] = {}
    for name, formfield in form.fields.items():
        value = form.get_initial_for_field(formfield, name)
        if formfield.disabled or value is None or value is False:
            continue
        data[name] = "on" if value is True else formfield.prepare_value(value)
    return {**data, **overrides}


def _search_term(model_admin: TenantScopedAdmin, obj: models.Model) -> str:
    lookup = model_admin.search_fields[0].lstrip("^=@")
    return str(functools.reduce(getattr, lookup.split("__"), obj))


# --- the walk -------------------------------------------------------------------------------


def test_every_registered_admin_is_tenant_scoped_or_global():
    for model, model_admin in admin.site._registry.items():
        if model in GLOBAL_ADMINS:
            continue
        assert isinstance(model_admin, TenantScopedAdmin), f"{model.__name__}'s admin must subclass TenantScopedAdmin"


def test_walk_every_admin_tenant_b_is_invisible_in_changelist_and_search(world):
    client = _client(world.admin)
    for model, model_admin in _scoped_admins():
        assert model in world.b.objects, f"add a {model.__name__} to tests/test_admin.py's _populate"
        a_obj, b_obj = world.a[model], world.b[model]
        shown = _result_pks(client.get(_url(model, "changelist")))
        assert a_obj.pk in shown and b_obj.pk not in shown, model
        if model_admin.search_fields:
            found = _result_pks(client.get(_url(model, "changelist"), {"q": _search_term(model_admin, b_obj)}))
            assert b_obj.pk not in found, model
            found = _result_pks(client.get(_url(model, "changelist"), {"q": _search_term(model_admin, a_obj)}))
            assert a_obj.pk in found, model


def test_walk_every_admin_tenant_b_urls_answer_like_missing_objects(world):
    for model, _ in _scoped_admins():
        b_obj, missing = world.b[model], _missing_pk(model)
        for view, method in (("change", "get"), ("change", "post"), ("delete", "get"), ("delete", "post"),
                             ("history", "get")):
            # A fresh client each time: messages left unread would carry over to the next answer.
            foreign = _outcome(getattr(_client(world.admin), method)(_url(model, view, b_obj.pk)), b_obj.pk)
            absent = _outcome(getattr(_client(world.admin), method)(_url(model, view, missing)), missing)
            assert foreign == absent, (model, view, method, foreign, absent)
        assert model._default_manager.filter(pk=b_obj.pk).exists()
        # The admin's "view on site" shortcut answers the same for both, too.
        content_type = ContentType.objects.get_for_model(model).pk
        shortcut = [_client(world.admin).get(f"/admin/r/{content_type}/{pk}/") for pk in (b_obj.pk, missing)]
        assert len({(r.status_code, r.content) for r in shortcut}) == 1, model


def test_walk_every_foreign_key_autocomplete_offers_only_own_tenant(world):
    client = _client(world.admin)
    checked = 0
    for source in {m for m in admin.site._registry} | {Message}:
        for fk in source._meta.get_fields():
            if not (fk.many_to_one and fk.concrete and fk.related_model in admin.site._registry):
                continue
            target_admin = admin.site._registry[fk.related_model]
            if not isinstance(target_admin, TenantScopedAdmin) or not target_admin.search_fields:
                continue
            params = {"app_label": source._meta.app_label, "model_name": source._meta.model_name, "field_name": fk.name}
            for side, expect in ((world.b, False), (world.a, True)):
                obj = side[fk.related_model]
                response = client.get("/admin/autocomplete/", {**params, "term": _search_term(target_admin, obj)})
                ids = {row["id"] for row in response.json()["results"]}
                assert (str(obj.pk) in ids) is expect, (source, fk.name, side.tenant)
            checked += 1
    assert checked >= 10


def test_member_reads_but_cannot_add_change_or_delete(world):
    client = _client(world.member)
    for model, _ in _scoped_admins():
        a_obj = world.a[model]
        assert client.get(_url(model, "changelist")).status_code == 200, model
        page = client.get(_url(model, "change", a_obj.pk))
        assert page.status_code == 200 and not page.context["has_change_permission"], model
        assert client.post(_url(model, "change", a_obj.pk), {}).status_code == 403, model
        assert client.get(_url(model, "add")).status_code == 403, model
        assert client.get(_url(model, "delete", a_obj.pk)).status_code == 403, model
    assert EndUser.objects.filter(pk=world.a[EndUser].pk).exists()


def test_staff_without_membership_sees_nothing(world):
    stranger = User.objects.create_user(username="stranger@x.test", password=PASSWORD, is_staff=True)
    client = _client(stranger)
    assert client.get("/admin/").context["app_list"] == []
    for model, _ in _scoped_admins():
        assert client.get(_url(model, "changelist")).status_code == 403, model


def test_superuser_sees_every_tenant(world):
    root = User.objects.create_superuser(username="root", password=PASSWORD)
    client = _client(root)
    for model, _ in _scoped_admins():
        shown = _result_pks(client.get(_url(model, "changelist")))
        assert {world.a[model].pk, world.b[model].pk} <= shown, model


def test_tenant_admin_cannot_touch_global_admins(world):
    client = _client(world.owner)
    assert client.get(_url(ModelPrice, "changelist")).status_code == 200  # prices are readable
    price = ModelPrice.objects.get(model="gpt-4o")
    assert client.post(_url(ModelPrice, "change", price.pk), {"model": "gpt-4o"}).status_code == 403
    assert client.get(_url(User, "changelist")).status_code == 403
    assert client.get(_url(Group, "changelist")).status_code == 403


# --- new objects and choices ----------------------------------------------------------------


def test_new_object_gets_the_users_tenant_whatever_is_posted(world):
    client = _client(world.admin)
    response = client.post(_url(EndUser, "add"), {"external_id": "new-one", "tenant": world.b.tenant.pk})
    assert response.status_code == 302
    assert EndUser.objects.get(external_id="new-one").tenant == world.a.tenant


def test_foreign_related_choices_are_refused(world):
    client = _client(world.admin)
    data = _form_defaults(client, _url(Assistant, "add"), slug="fresh")
    refused = client.post(_url(Assistant, "add"), {**data, "credential": world.b[ProviderCredential].pk})
    assert refused.status_code == 200 and "credential" in refused.context["adminform"].form.errors
    accepted = client.post(_url(Assistant, "add"), {**data, "credential": world.a[ProviderCredential].pk})
    assert accepted.status_code == 302
    assert Assistant.objects.get(slug="fresh").tenant == world.a.tenant

    cap = {"scope": "end_user", "period": "day", "limit_usd": "2", "alert_thresholds": "[50]"}
    refused = client.post(_url(SpendingCap, "add"), {**cap, "end_user": world.b[EndUser].pk})
    assert "end_user" in refused.context["adminform"].form.errors
    assert client.post(_url(SpendingCap, "add"), {**cap, "end_user": world.a[EndUser].pk}).status_code == 302


def test_user_of_two_tenants_picks_one_and_cannot_mix_them(world, tenant_factory):
    charlie = tenant_factory(slug="charlie").tenant
    Membership.objects.create(tenant=charlie, user=world.admin, role=Membership.Role.OWNER)
    client = _client(world.admin)
    form = client.get(_url(EndUser, "add")).context["adminform"].form
    assert set(form.fields["tenant"].queryset) == {world.a.tenant, charlie}

    mixed = _form_defaults(client, _url(Assistant, "add"), tenant=charlie.pk, slug="mixed",
                           credential=world.a[ProviderCredential].pk)
    response = client.post(_url(Assistant, "add"), mixed)
    assert response.status_code == 200 and "credential" in response.context["adminform"].form.errors
    foreign = client.post(_url(EndUser, "add"), {"tenant": world.b.tenant.pk, "external_id": "x"})
    assert "tenant" in foreign.context["adminform"].form.errors


def test_cap_thresholds_default_and_validate(world):
    client = _client(world.owner)
    form = client.get(_url(SpendingCap, "add")).context["adminform"].form
    assert form.initial["alert_thresholds"] == [50, 80, 100]
    bad = client.post(_url(SpendingCap, "add"), {"scope": "tenant", "period": "month", "limit_usd": "3",
                                                 "alert_thresholds": "[150]"})
    assert "alert_thresholds" in bad.context["adminform"].form.errors


# --- roles ----------------------------------------------------------------------------------


def test_owner_edits_tenant_name_and_limits_but_not_slug(world):
    tenant = world.a.tenant
    data = {"name": "Alpha Renamed", "end_user_rpm": 5, "tenant_rpm": 50, "tenant_tpm": 5000, "slug": "hijack",
            "memberships-TOTAL_FORMS": 0, "memberships-INITIAL_FORMS": 0}  # the read-only members inline
    assert _client(world.admin).post(_url(Tenant, "change", tenant.pk), data).status_code == 403
    assert _client(world.owner).post(_url(Tenant, "change", tenant.pk), data).status_code == 302
    tenant.refresh_from_db()
    assert (tenant.name, tenant.end_user_rpm, tenant.slug) == ("Alpha Renamed", 5, "alpha")
    assert _client(world.owner).get(_url(Tenant, "add")).status_code == 403
    assert _client(world.owner).get(_url(Tenant, "delete", tenant.pk)).status_code == 403


def test_admin_cannot_make_or_change_owners(world):
    client = _client(world.admin)
    owner_membership = world.a[Membership]
    assert client.post(_url(Membership, "change", owner_membership.pk), {"role": "member"}).status_code == 403
    member_membership = Membership.objects.get(user=world.member)
    response = client.post(_url(Membership, "change", member_membership.pk), {"role": "owner"})
    assert "role" in response.context["adminform"].form.errors
    assert client.post(_url(Membership, "change", member_membership.pk), {"role": "admin"}).status_code == 302
    assert Membership.objects.get(user=world.member).role == "admin"


def test_membership_user_choices_are_co_members_only(world):
    form = _client(world.owner).get(_url(Membership, "add")).context["adminform"].form
    usernames = set(form.fields["user"].queryset.values_list("username", flat=True))
    assert usernames == {"owner@alpha.test", "admin@alpha.test", "member@alpha.test"}


# --- API keys, end users, credentials -------------------------------------------------------


def test_api_key_is_shown_once_then_only_its_prefix(world):
    client = _client(world.admin)
    response = client.post(_url(ApiKey, "add"), {"name": "ci-key", "allowed_models": "[]", "rpm": ""}, follow=True)
    shown = re.findall(r"pk_[0-9a-f]{12}_[A-Za-z0-9_-]+", response.content.decode())
    assert len(set(shown)) == 1
    plaintext = shown[0]
    key = api_key_authenticate(plaintext)
    assert key.tenant == world.a.tenant and key.name == "ci-key"

    for page in (client.get(_url(ApiKey, "changelist")), client.get(_url(ApiKey, "change", key.pk))):
        body = page.content.decode()
        assert plaintext not in body and key.key_hash not in body
        assert f"pk_{key.prefix}_…" in body


def test_revoke_action_revokes_own_keys_only(world):
    a_key, b_key = world.a[ApiKey], world.b[ApiKey]
    selection = {"action": "revoke", "_selected_action": [a_key.pk, b_key.pk]}
    _client(world.admin).post(_url(ApiKey, "changelist"), selection)
    a_key.refresh_from_db()
    b_key.refresh_from_db()
    assert a_key.revoked_at is not None and b_key.revoked_at is None


def test_revoked_key_no_longer_authenticates(world, tenant_factory):
    setup = tenant_factory(slug="delta")
    owner_add(tenant=setup.tenant, email="owner@delta.test", password=PASSWORD)
    key = api_key_authenticate(setup.api_key)
    client = _client(User.objects.get(username="owner@delta.test"))
    client.post(_url(ApiKey, "changelist"), {"action": "revoke", "_selected_action": [key.pk]})
    with pytest.raises(InvalidApiKey):
        api_key_authenticate(setup.api_key)


def test_block_and_unblock_end_users(world):
    a_user, b_user = world.a[EndUser], world.b[EndUser]
    token = end_user_token_issue(end_user=a_user, ttl_seconds=60).token
    client = _client(world.admin)
    client.post(_url(EndUser, "changelist"), {"action": "block", "_selected_action": [a_user.pk, b_user.pk]})
    a_user.refresh_from_db()
    b_user.refresh_from_db()
    assert a_user.is_blocked and not b_user.is_blocked
    with pytest.raises(InvalidEndUserToken):
        end_user_token_verify(token)
    client.post(_url(EndUser, "changelist"), {"action": "unblock", "_selected_action": [a_user.pk]})
    assert end_user_token_verify(token) == a_user


def test_member_cannot_run_editing_actions(world):
    a_user = world.a[EndUser]
    _client(world.member).post(_url(EndUser, "changelist"), {"action": "block", "_selected_action": [a_user.pk]})
    a_user.refresh_from_db()
    assert not a_user.is_blocked


def test_credential_key_is_write_only(world):
    credential = world.a[ProviderCredential]
    client = _client(world.admin)
    body = client.get(_url(ProviderCredential, "change", credential.pk)).content.decode()
    assert PROVIDER_KEY not in body and "sk-…cdef" in body
    data = {"name": credential.name, "base_url": credential.base_url, "organization": "", "new_api_key": ""}
    assert client.post(_url(ProviderCredential, "change", credential.pk), data).status_code == 302
    credential.refresh_from_db()
    assert credential.api_key == PROVIDER_KEY  # blank keeps the key
    client.post(_url(ProviderCredential, "change", credential.pk), {**data, "new_api_key": "sk-replaced-key-9999"})
    credential.refresh_from_db()
    assert credential.api_key == "sk-replaced-key-9999"


def test_test_connection_reports_success_and_failure(world):
    good = world.a[ProviderCredential]
    bad = ProviderCredential.objects.create(
        tenant=world.a.tenant, name="down", base_url="http://127.0.0.1:9/v1", api_key=PROVIDER_KEY
    )
    response = _client(world.admin).post(
        _url(ProviderCredential, "changelist"),
        {"action": "test_connection", "_selected_action": [good.pk, bad.pk, world.b[ProviderCredential].pk]},
    )
    notes = {m.message: m.level_tag for m in get_messages(response.wsgi_request)}
    assert len(notes) == 2
    assert any("connected" in text and "gpt-4o-mini" in text and level == "success" for text, level in notes.items())
    assert any("down" in text and "failed" in text and level == "error" for text, level in notes.items())
    assert all(PROVIDER_KEY not in text for text in notes)


# --- transcript and usage page --------------------------------------------------------------


def test_transcript_lists_messages_in_order_with_cost(world):
    conversation = world.a[Conversation]
    response = _client(world.member).get(_url(Conversation, "change", conversation.pk))
    body = response.content.decode()
    assert body.index("hello from alpha") < body.index("alpha answer")
    assert "clock" in body  # the tool call
    assert f"{world.a[UsageRecord].cost_usd:.6f}" in body
    assert "bravo" not in body


def test_usage_page_shows_own_spend_only(world):
    client = _client(world.admin)
    response = client.get(reverse("admin:billing_usage"))
    body = response.content.decode()
    assert response.status_code == 200 and "<svg" in body
    assert "alpha-customer" in body and "gpt-4o-mini" in body
    assert "bravo-customer" not in body and "gpt-3.5-turbo" not in body
    assert f"{world.a[UsageRecord].cost_usd:.4f}" in body


def test_usage_page_foreign_tenant_answers_like_unknown(world):
    client = _client(world.admin)
    foreign = client.get(reverse("admin:billing_usage"), {"tenant": "bravo"})
    unknown = client.get(reverse("admin:billing_usage"), {"tenant": "no-such-tenant"})
    assert foreign.status_code == unknown.status_code == 404


def test_usage_page_switches_between_own_tenants(world, tenant_factory):
    charlie = tenant_factory(slug="charlie").tenant
    Membership.objects.create(tenant=charlie, user=world.admin, role=Membership.Role.MEMBER)
    body = _client(world.admin).get(reverse("admin:billing_usage"), {"tenant": "charlie"}).content.decode()
    assert 'value="charlie" selected' in body and "alpha-customer" not in body


def test_usage_page_queries_are_bounded(world, django_assert_max_num_queries):
    client = _client(world.admin)
    for day in range(20):
        usage_record(
            usage=UsageInput(call_id=f"extra-{day}", tenant_id=world.a.tenant.pk, model="gpt-4o",
                             prompt_tokens=10, completion_tokens=10, end_user_id=world.a[EndUser].pk),
            price=price_for("gpt-4o"),
        )
    with django_assert_max_num_queries(15):
        assert client.get(reverse("admin:billing_usage")).status_code == 200


# --- the audit trail ------------------------------------------------------------------------


def test_admin_changes_key_creation_and_revocation_are_in_the_tenants_own_trail(world):
    credential = world.a[ProviderCredential]
    client = _client(world.admin)
    data = {"name": credential.name, "base_url": credential.base_url, "organization": "", "new_api_key": "sk-rotated-0000"}
    client.post(_url(ProviderCredential, "change", credential.pk), data)
    client.post(_url(ApiKey, "add"), {"name": "audited", "allowed_models": "[]", "rpm": ""})
    key = ApiKey.objects.get(name="audited")
    client.post(_url(ApiKey, "changelist"), {"action": "revoke", "_selected_action": [key.pk]})

    trail = AuditEntry.objects.filter(tenant=world.a.tenant, actor=world.admin).order_by("created_at")
    actions = [(e.action, e.object_type) for e in trail]
    assert ("admin.change", "tenants.ProviderCredential") in actions
    assert ("api_key.create", "tenants.ApiKey") in actions and ("api_key.revoke", "tenants.ApiKey") in actions
    change = trail.get(action="admin.change", object_type="tenants.ProviderCredential")
    assert "sk-rotated-0000" not in json.dumps(change.changes) and change.changes  # what changed, not the value
    # Tenant B's owner sees none of it.
    b_owner = world.b[Membership].user
    visible = _client(b_owner).get(_url(AuditEntry, "changelist")).context["cl"].queryset
    assert visible.exists() and not visible.filter(tenant=world.a.tenant).exists()


def test_key_rotation_is_recorded(world):
    from io import StringIO

    from django.core.management import call_command

    call_command("rotate_encryption_keys", stdout=StringIO())
    entry = AuditEntry.objects.get(action="encryption.rotate")
    assert entry.tenant is None and entry.changes["rotated"] >= 2


def test_deleting_a_cached_answer_invalidates_it_and_keys_show_the_opt_in(world):
    client = _client(world.admin)
    entry = world.a[CachedAnswer]
    listed = client.get(_url(CachedAnswer, "changelist"))
    assert listed.status_code == 200 and "a faq" in listed.content.decode()
    assert client.get(_url(CachedAnswer, "add")).status_code == 403
    response = client.post(_url(CachedAnswer, "delete", entry.pk), {"post": "yes"})
    assert response.status_code == 302 and not CachedAnswer.objects.filter(pk=entry.pk).exists()
    # One audit entry for one deletion (log_deletion and log_deletions both wrote one before).
    assert AuditEntry.objects.filter(tenant=world.a.tenant, action="admin.delete").count() == 1

    key = world.a[ApiKey]
    change = _url(ApiKey, "change", key.pk)
    assert 'name="response_cache"' in client.get(change).content.decode()
    client.post(change, _form_defaults(client, change, response_cache="on"))
    assert ApiKey.objects.get(pk=key.pk).response_cache
