"""manage.py end_user_token SLUG EXTERNAL_ID [--ttl SECONDS]: prints {"token", "expires_at"}."""

from __future__ import annotations

import json

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenants.models import Tenant
from tenants.services import end_user_get_or_create, end_user_token_issue


class Command(BaseCommand):
    help = "Mint a signed WebSocket token for one of a tenant's end users."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug")
        parser.add_argument("external_id")
        parser.add_argument("--ttl", type=int, default=settings.END_USER_TOKEN_DEFAULT_TTL)

    def handle(self, *args, **options) -> None:
        if options["ttl"] <= 0:
            raise CommandError("--ttl must be a positive number of seconds")
        external_id = options["external_id"].strip()
        if not external_id or len(external_id) > 200:
            raise CommandError("EXTERNAL_ID must be 1 to 200 characters")
        try:
            tenant = Tenant.objects.get(slug=options["slug"])
        except Tenant.DoesNotExist:
            raise CommandError(f"no tenant {options['slug']!r}") from None
        end_user = end_user_get_or_create(tenant_id=tenant.pk, external_id=external_id)
        issued = end_user_token_issue(end_user=end_user, ttl_seconds=options["ttl"])
        self.stdout.write(
            json.dumps({"token": issued.token, "expires_at": issued.expires_at.isoformat().replace("+00:00", "Z")})
        )
