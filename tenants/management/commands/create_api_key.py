"""manage.py create_api_key SLUG: prints {"api_key": "..."} (shown once, stored hashed)."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from tenants.models import Tenant
from tenants.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a tenant."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug")
        parser.add_argument("--name", default="default")

    def handle(self, *args, **options) -> None:
        try:
            tenant = Tenant.objects.get(slug=options["slug"])
        except Tenant.DoesNotExist:
            raise CommandError(f"no tenant {options['slug']!r}") from None
        issued = api_key_create(tenant=tenant, name=options["name"])
        self.stdout.write(json.dumps({"api_key": issued.plaintext}))
