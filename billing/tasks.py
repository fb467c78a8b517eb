"""Billing tasks: cap alert emails, expiring reservations left by crashed processes."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings
from django.core.mail import send_mail

from tenants.models import Membership

from .caps import reservations_expire
from .models import CapAlert
from .processes import processes_recover

TIME_LIMITS = {"soft_time_limit": 60, "time_limit": 90}


@shared_task(acks_late=True, **TIME_LIMITS)
def cap_alerts_notify(alert_ids: list[int]) -> int:
    """Email the tenant's owners and admins about each threshold crossed (one email per alert:
    the alert row was created exactly once)."""
    sent = 0
    for alert in CapAlert.objects.filter(pk__in=alert_ids).select_related("cap", "tenant"):
        recipients = list(
            Membership.objects.for_tenant(alert.tenant)
            .filter(role__in=[Membership.Role.OWNER, Membership.Role.ADMIN])
            .exclude(user__email="")
            .values_list("user__email", flat=True)
        )
        if not recipients:
            continue
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
        sent += 1
    return sent


@shared_task(acks_late=True, **TIME_LIMITS)
def reservations_expire_stale() -> int:
    return reservations_expire(older_than=timedelta(seconds=settings.RESERVATION_TTL_SECONDS))


@shared_task(acks_late=True, **TIME_LIMITS)
def processes_recover_stale() -> int:
    """Beat: book the in-flight `/v1` calls of every web process that stopped beating (from
    their last checkpoints), settle its reservations and return its leases."""
    return processes_recover()
