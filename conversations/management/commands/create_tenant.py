"""manage.py create_tenant SLUG …: prints {"tenant", "assistant", "api_key"}."""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.validators import validate_slug
from django.db import IntegrityError

from billing.services import PriceMissing
from conversations.onboarding import tenant_onboard
from tenants.egress import provider_url_refusal
from tenants.models import Tenant
from tenants.origins import InvalidOrigin, origins_parse, tenant_allowed_origins_set


def _money(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise CommandError(f"--monthly-cap must be a number of USD, got {value!r}") from None
    if amount < 0 or not amount.is_finite():
        raise CommandError("--monthly-cap must be zero or more")
    return amount


def _origins(value: str) -> list[str]:
    try:
        return origins_parse(value.split(","))
    except InvalidOrigin as error:
        raise CommandError(f"--allowed-origins: {error}") from None


class Command(BaseCommand):
    help = "Create a tenant with its provider credential, default assistant and an API key."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug")
        parser.add_argument("--name", default="")
        parser.add_argument("--model", default="gpt-4o-mini")
        parser.add_argument("--provider-base-url", default="https://api.openai.com/v1")
        parser.add_argument("--provider-key", default="")
        parser.add_argument("--monthly-cap", type=_money, default=None)
        parser.add_argument("--user-rpm", type=int, default=None, help="requests a minute per end user")
        parser.add_argument("--tenant-rpm", type=int, default=None, help="requests a minute for the whole tenant")
        parser.add_argument("--tenant-tpm", type=int, default=None, help="tokens a minute for the whole tenant")
        parser.add_argument("--tools", default="", help="comma-separated built-in tool names")
        parser.add_argument("--allowed-origins", type=_origins, default=[], help="comma-separated widget origins")
        parser.add_argument("--owner-email", default=None)
        parser.add_argument("--owner-password", default=None)

    def handle(self, *args, **options) -> None:
        slug = options["slug"]
        try:
            validate_slug(slug)
        except ValidationError:
            raise CommandError(f"{slug!r} is not a valid slug (letters, digits, - and _)") from None
        if Tenant.objects.filter(slug=slug).exists():
            raise CommandError(f"tenant {slug!r} already exists")
        if bool(options["owner_email"]) != bool(options["owner_password"]):
            raise CommandError("--owner-email and --owner-password go together")
        for option in ("user_rpm", "tenant_rpm", "tenant_tpm"):
            if options[option] is not None and not 1 <= options[option] <= 2**31 - 1:
                raise CommandError(f"--{option.replace('_', '-')} must be between 1 and {2**31 - 1}")
        refusal = provider_url_refusal(options["provider_base_url"])
        if refusal is not None:
            raise CommandError(f"--provider-base-url is refused: {refusal} (see PROVIDER_ALLOW_PRIVATE_URLS)")
        tools = [t.strip() for t in options["tools"].split(",") if t.strip()]
        try:
            onboarded = tenant_onboard(
                slug=slug,
                name=options["name"],
                model=options["model"],
                provider_base_url=options["provider_base_url"],
                provider_key=options["provider_key"],
                monthly_cap_usd=options["monthly_cap"],
                user_rpm=options["user_rpm"],
                tenant_rpm=options["tenant_rpm"],
                tenant_tpm=options["tenant_tpm"],
                tools=tools,
                owner_email=options["owner_email"],
                owner_password=options["owner_password"],
            )
        except PriceMissing as error:
            raise CommandError(str(error)) from None
        except IntegrityError as error:
            raise CommandError(f"could not create tenant: {error}") from None
        if options["allowed_origins"]:
            tenant_allowed_origins_set(tenant=onboarded.tenant, origins=options["allowed_origins"])
        self.stdout.write(
            json.dumps(
                {"tenant": onboarded.tenant.slug, "assistant": onboarded.assistant.slug, "api_key": onboarded.api_key}
            )
        )
