"""Tenant, Membership, EndUser, ProviderCredential, ApiKey."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from .crypto import EncryptedTextField, mask


class TenantQuerySet(models.QuerySet):
    def for_tenant(self, tenant: Tenant | int) -> TenantQuerySet:
        tenant_id = tenant if isinstance(tenant, int) else tenant.pk
        return self.filter(tenant_id=tenant_id)


TenantManager = models.Manager.from_queryset(TenantQuerySet)


class Tenant(models.Model):
    id = models.BigAutoField(primary_key=True)
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True)
    # Requests a minute each end user may make (enforced by tenants/ratelimits.py).
    end_user_rpm = models.PositiveIntegerField(default=20)
    # Whole-tenant limits across all its end users and keys (requests and tokens a minute).
    tenant_rpm = models.PositiveIntegerField(default=600)
    tenant_tpm = models.PositiveIntegerField(default=2_000_000)
    # Browser origins ("https://shop.example") whose pages may open end-user token sockets (the
    # embeddable widget), besides the operator's own hosts.
    allowed_origins = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.slug


class Membership(models.Model):
    class Role(models.TextChoices):
        OWNER = "owner"
        ADMIN = "admin"
        MEMBER = "member"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantManager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "user"], name="membership_unique")]

    def __str__(self) -> str:
        return f"{self.user} in {self.tenant} ({self.role})"


class EndUser(models.Model):
    """A tenant's customer, known to Parley only by the tenant's own identifier."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="end_users")
    external_id = models.CharField(max_length=200)
    is_blocked = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "external_id"], name="end_user_unique")
        ]

    def __str__(self) -> str:
        return self.external_id


class ProviderCredential(models.Model):
    """Where a tenant's model calls go, and the key they carry (encrypted at rest)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="credentials")
    name = models.CharField(max_length=100, default="default")
    base_url = models.URLField(max_length=500, default="https://api.openai.com/v1")
    organization = models.CharField(max_length=100, blank=True, default="")
    api_key = EncryptedTextField(blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = TenantManager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="credential_unique_name")
        ]

    @property
    def masked_key(self) -> str:
        return mask(self.api_key)

    def __str__(self) -> str:
        return f"{self.name} ({self.base_url}, {self.masked_key or 'no key'})"

    def __repr__(self) -> str:
        return f"<ProviderCredential {self.pk} {self.base_url} {self.masked_key}>"


class ApiKey(models.Model):
    """`pk_<prefix>_<secret>`: the prefix is stored for lookup, the whole key only as a hash."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, default="default")
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64)
    allowed_models = models.JSONField(default=list, blank=True)
    # Requests a minute through this key; null = only the tenant's limits apply.
    rpm = models.PositiveIntegerField(null=True, blank=True)
    # Opt-in exact caching of whole /v1 requests made with this key.
    response_cache = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = TenantManager()

    class Meta:
        verbose_name, verbose_name_plural = "API key", "API keys"

    def __str__(self) -> str:
        return f"pk_{self.prefix}_… ({self.name})"


class AuditEntry(models.Model):
    """Who did what to which object, when: admin changes, API keys, credentials, key rotation.
    Append-only. `changes` names what changed, never a secret's value."""

    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="audit_entries")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_label = models.CharField(max_length=200, blank=True, default="")
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=100, blank=True, default="")
    object_id = models.CharField(max_length=64, blank=True, default="")
    object_repr = models.CharField(max_length=200, blank=True, default="")
    changes = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    objects = TenantManager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "-created_at"])]
        verbose_name_plural = "audit entries"

    def __str__(self) -> str:
        return f"{self.action} {self.object_type} {self.object_repr}"
