"""Billing tasks: sending cap alerts (the outbox), expiring reservations left by crashed processes."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task
from django.conf import settings

from .alerts import alerts_send
from .caps import reservations_expire
from .processes import processes_recover

TIME_LIMITS = {"soft_time_limit": 60, "time_limit": 90}


@shared_task(acks_late=True, **TIME_LIMITS)
def cap_alerts_notify(alert_ids: list[int] | None = None) -> int:
    """Send every unsent cap alert (beat, and a nudge after the commit that recorded one).
    `alert_ids` is ignored: messages queued before the outbox carried it, and the outbox knows."""
    return alerts_send()


@shared_task(acks_late=True, **TIME_LIMITS)
def reservations_expire_stale() -> int:
    return reservations_expire(older_than=timedelta(seconds=settings.RESERVATION_TTL_SECONDS))


def cap_alerts_nudge() -> None:
    """After a commit that recorded alerts: have a worker send them now rather than at the next
    beat (registered with billing.alerts in BillingConfig.ready)."""
    cap_alerts_notify.delay()


@shared_task(acks_late=True, **TIME_LIMITS)
def processes_recover_stale() -> int:
    """Beat: book the in-flight `/v1` calls of every web process that stopped beating (from
    their last checkpoints), settle its reservations and return its leases."""
    return processes_recover()
