"""Small factories: test data made through the same services production uses."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from conversations.models import Assistant
from conversations.onboarding import tenant_onboard
from tenants.models import EndUser, Tenant
from tenants.services import end_user_get_or_create, end_user_token_issue

PROVIDER_KEY = "sk-test-PLAINTEXT-provider-key-0123456789abcdef"
_counter = itertools.count(1)


@dataclass
class TenantSetup:
    tenant: Tenant
    assistant: Assistant
    api_key: str

    def end_user(self, external_id: str = "user-1") -> EndUser:
        return end_user_get_or_create(tenant_id=self.tenant.pk, external_id=external_id)

    def token(self, external_id: str = "user-1", ttl: int = 3600) -> str:
        return end_user_token_issue(end_user=self.end_user(external_id), ttl_seconds=ttl).token


def make_tenant(*, base_url: str, slug: str | None = None, **options) -> TenantSetup:
    slug = slug or f"tenant-{next(_counter)}"
    onboarded = tenant_onboard(
        slug=slug,
        name=slug.title(),
        provider_base_url=base_url,
        provider_key=options.pop("provider_key", PROVIDER_KEY),
        **options,
    )
    return TenantSetup(tenant=onboarded.tenant, assistant=onboarded.assistant, api_key=onboarded.api_key)
