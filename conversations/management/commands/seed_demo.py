"""manage.py seed_demo: the demo tenant for `make run` (idempotent), and how to sign in."""

from __future__ import annotations

import json
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from conversations.onboarding import tenant_onboard
from tenants.models import ProviderCredential, Tenant
from tenants.services import api_key_create, owner_add

DEMO_SLUG = "demo"
DEMO_EMAIL = "admin@demo.local"


def _login_works(password: str) -> bool:
    user = get_user_model().objects.filter(username=DEMO_EMAIL).first()
    return user is not None and user.check_password(password)


class Command(BaseCommand):
    help = "Create or refresh the demo tenant and print its admin login and an API key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="where this server listens")

    def handle(self, *args, **options) -> None:
        base_url = options["base_url"].rstrip("/")
        if settings.OPENAI_API_KEY:
            provider_url, provider_key, provider = settings.OPENAI_BASE_URL, settings.OPENAI_API_KEY, "OpenAI"
        else:
            provider_url, provider_key = f"{base_url}/simulator/v1", "sk-simulator"
            provider = "the built-in simulator (set OPENAI_API_KEY to use OpenAI)"
        credentials_file = settings.VAR_DIR / "demo_credentials.json"
        saved = json.loads(credentials_file.read_text()) if credentials_file.exists() else {}
        password = saved.get("password") or secrets.token_urlsafe(12)
        with transaction.atomic():
            tenant = Tenant.objects.filter(slug=DEMO_SLUG).first()
            if tenant is None:
                onboarded = tenant_onboard(
                    slug=DEMO_SLUG,
                    name="Demo Company",
                    provider_base_url=provider_url,
                    provider_key=provider_key,
                    owner_email=DEMO_EMAIL,
                    owner_password=password,
                    tools=["calculator", "current_time"],
                )
                api_key = onboarded.api_key
            else:
                credential, _ = ProviderCredential.objects.get_or_create(tenant=tenant, name="default")
                if (credential.base_url, credential.api_key) != (provider_url, provider_key):
                    credential.base_url, credential.api_key = provider_url, provider_key
                    credential.save()
                # Setting the same password again would still sign every browser out (the
                # session hash changes with the salt): keep a login that works as it is.
                owner_add(tenant=tenant, email=DEMO_EMAIL, password="" if _login_works(password) else password)
                api_key = saved.get("api_key") or api_key_create(tenant=tenant, name="demo").plaintext
        settings.VAR_DIR.mkdir(parents=True, exist_ok=True)
        credentials_file.write_text(json.dumps({"username": DEMO_EMAIL, "password": password, "api_key": api_key}))
        credentials_file.chmod(0o600)
        self.stdout.write(
            "\n".join(
                [
                    "",
                    "Parley demo is ready.",
                    f"  Chat page:  {base_url}/   (sign in as {DEMO_EMAIL} / {password})",
                    f"  Admin:      {base_url}/admin/",
                    f"  API key:    {api_key}",
                    f"  OpenAI SDK: OpenAI(base_url='{base_url}/v1', api_key='<API key>')",
                    f"  Model:      {provider}",
                    "",
                ]
            )
        )
