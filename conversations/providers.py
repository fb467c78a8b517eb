"""Where an assistant's upstream calls go: its credential as a `ProviderTarget` (plain data).

Below services and summaries alike (both call it), so neither imports the other for it.
"""

from __future__ import annotations

from llm.gateway import ProviderTarget
from tenants.services import credential_default

from .errors import InvalidInput
from .models import Assistant


def provider_target(assistant: Assistant) -> ProviderTarget:
    credential = assistant.credential or credential_default(tenant_id=assistant.tenant_id)
    if credential is None or credential.tenant_id != assistant.tenant_id:
        raise InvalidInput("this assistant has no provider credential configured")
    return ProviderTarget(
        credential_id=credential.pk,
        base_url=credential.base_url,
        api_key=credential.api_key,
        organization=credential.organization,
        version=credential.updated_at.timestamp(),
    )
