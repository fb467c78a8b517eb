"""manage.py reconcile_caps [--tenant SLUG]: cap counters vs the ledger; exits 1 on any drift."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.selectors import caps_reconcile
from billing.services import money_str
from tenants.models import Tenant


class Command(BaseCommand):
    help = "Recompute each cap period's spend from the usage ledger and report drift from the counters."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", default=None, help="only this tenant's caps")

    def handle(self, *args, **options) -> None:
        tenant_id = None
        if options["tenant"]:
            tenant_id = Tenant.objects.filter(slug=options["tenant"]).values_list("pk", flat=True).first()
            if tenant_id is None:
                raise CommandError(f"no tenant {options['tenant']!r}")
        report = caps_reconcile(tenant_id=tenant_id)
        drift = [
            {
                "period_id": p.period_id,
                "cap_id": p.cap_id,
                "subject": p.subject,
                "period_start": p.period_start.isoformat(),
                "counted_spent_usd": money_str(p.counted_spent),
                "ledger_spent_usd": money_str(p.ledger_spent),
                "counted_reserved_usd": money_str(p.counted_reserved),
                "held_reserved_usd": money_str(p.held_reserved),
            }
            for p in report.drift
        ]
        self.stdout.write(json.dumps({"periods_checked": len(report.periods), "drift": drift}))
        if drift:
            raise SystemExit(1)
