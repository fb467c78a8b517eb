"""Cap alerts as an outbox: the CapAlert row is written with the booking, and sent later.

Recording is part of the transaction that books the spend, so an alert exists exactly when the
crossing does (the unique constraint makes concurrent crossings one row). Sending is separate:
`alerts_send` claims each unsent row with a conditional UPDATE (unsent, and unclaimed or claimed
longer ago than CAP_ALERT_CLAIM_SECONDS — a sender that died), emails, then marks it sent. Beat
runs it periodically, so an alert survives a broker that was down at commit; after commit the
core also nudges a sender for promptness, through a hook the tasks module registers
(`sender_register`), so this module never imports the tasks that use it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from tenants.models import Membership

from .models import CapAlert, CapPeriod

logger = logging.getLogger(__name__)

_nudges: list[Callable[[], object]] = []


def sender_register(nudge: Callable[[], object]) -> None:
    """Called after a commit that recorded alerts (e.g. a task's `.delay`). Optional: beat
    sends whatever a missed nudge left."""
    if nudge not in _nudges:
        _nudges.append(nudge)


# --- recording (inside the booking's transaction) -----------------------------------------


def alerts_if_crossed(period_id: int, spent: Decimal, limit: Decimal, thresholds: Any) -> None:
    """`alerts_record`, only when the booked period is at or past one of its thresholds (the
    statement that booked it returned them): most bookings cross none and read nothing more."""
    if isinstance(thresholds, str):  # Django's psycopg setup leaves jsonb undecoded
        thresholds = json.loads(thresholds)
    if limit > 0 and any(spent * 100 / limit >= threshold for threshold in thresholds or ()):
        alerts_record(period_ids=[period_id])


def alerts_record(*, period_ids: Iterable[int]) -> list[CapAlert]:
    """Record each threshold newly crossed; the unique constraint makes concurrent crossings
    produce one alert. Sending happens after commit (nudge) or at the next beat."""
    created = []
    for period in CapPeriod.objects.filter(pk__in=list(period_ids)).select_related("cap"):
        if period.limit_usd <= 0:
            continue
        percent = period.spent_usd * 100 / period.limit_usd
        for threshold in period.cap.alert_thresholds or []:
            if percent < threshold:
                continue
            alert, made = _alert_once(period=period, threshold=int(threshold))
            if made:
                created.append(alert)
    if created:
        transaction.on_commit(_nudge)
    return created


def _alert_once(*, period: CapPeriod, threshold: int) -> tuple[CapAlert, bool]:
    with transaction.atomic():
        return CapAlert.objects.get_or_create(
            cap_id=period.cap_id,
            subject=period.subject,
            period_start=period.period_start,
            threshold=threshold,
            defaults={"tenant_id": period.tenant_id, "spent_usd": period.spent_usd},
        )


def _nudge() -> None:
    for nudge in _nudges:
        try:
            nudge()
        except Exception:  # noqa: BLE001 — a broker outage must not fail the committed booking
            logger.warning("cap alert nudge failed; beat will send the alert", exc_info=True)


# --- sending (beat, or a nudged worker) ---------------------------------------------------


def alerts_send(*, limit: int = 100) -> int:
    """Send unsent alerts, each exactly once across concurrent senders. Returns how many
    emails went out. A send that raises releases its claim for the next run."""
    sent = 0
    for alert_id in _sendable_ids(limit):
        claimed_at = timezone.now()
        if not _claim(alert_id, claimed_at):
            continue  # another sender has it
        try:
            delivered = _deliver(CapAlert.objects.select_related("cap", "tenant").get(pk=alert_id))
        except Exception:
            CapAlert.objects.filter(pk=alert_id, claimed_at=claimed_at).update(claimed_at=None)
            raise
        CapAlert.objects.filter(pk=alert_id, claimed_at=claimed_at).update(sent_at=timezone.now())
        sent += delivered
    return sent


def _stale_before() -> Any:
    return timezone.now() - timedelta(seconds=settings.CAP_ALERT_CLAIM_SECONDS)


def _unsent() -> Q:
    return Q(sent_at__isnull=True) & (Q(claimed_at__isnull=True) | Q(claimed_at__lt=_stale_before()))


def _sendable_ids(limit: int) -> list[int]:
    return list(CapAlert.objects.filter(_unsent()).order_by("pk").values_list("pk", flat=True)[:limit])


def _claim(alert_id: int, claimed_at: Any) -> bool:
    """The conditional claim: of two senders, exactly one UPDATE matches the unsent row."""
    return CapAlert.objects.filter(_unsent(), pk=alert_id).update(claimed_at=claimed_at) == 1


def _deliver(alert: CapAlert) -> int:
    """Email the tenant's owners and admins; 0 when nobody has an address (still 'sent')."""
    recipients = list(
        Membership.objects.for_tenant(alert.tenant)
        .filter(role__in=[Membership.Role.OWNER, Membership.Role.ADMIN])
        .exclude(user__email="")
        .values_list("user__email", flat=True)
    )
    if not recipients:
        return 0
    cap = alert.cap
    send_mail(
        subject=f"[Parley] {alert.tenant.name}: {alert.threshold}% of the {cap.period} {cap.scope} cap used",
        message=(
            f"Spend has reached ${alert.spent_usd.normalize():f} of the ${cap.limit_usd.normalize():f} "
            f"{cap.period} {cap.scope} cap ({alert.threshold}% threshold)."
        ),
        from_email=settings.DEFAULT_FROM_EMAIL,
        recipient_list=recipients,
    )
    return 1
