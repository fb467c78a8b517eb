"""Cap alerts as an outbox: recorded with the booking, sent once by whichever sender claims them."""

from __future__ import annotations

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core import mail
from django.db import connection
from django.utils import timezone
from kombu.exceptions import OperationalError

from billing import alerts
from billing.caps import Subject, cap_reserve, cap_settle
from billing.models import CapAlert, SpendingCap
from billing.tasks import cap_alerts_notify
from tenants.services import owner_add

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def owner_tenant(tenant_factory):
    setup = tenant_factory()
    owner_add(tenant=setup.tenant, email="owner@example.com", password="pw-123-long")
    return setup.tenant


@pytest.fixture
def nudges(monkeypatch):
    """Nudges sent after commit, recorded instead of reaching a worker."""
    calls: list[tuple] = []
    monkeypatch.setattr(cap_alerts_notify, "delay", lambda *args: calls.append(args))
    return calls


@pytest.fixture
def eager():
    """Celery in-process, as embedded mode runs it (in services mode too, for this test)."""
    from config.celery import app

    before = app.conf.task_always_eager
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = before


@pytest.fixture
def broker_down(monkeypatch):
    def refuse(*args):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(cap_alerts_notify, "delay", refuse)


def _spend(tenant, amount: str, call_id: str) -> None:
    reservation = cap_reserve(subject=Subject(tenant.pk), amount=Decimal(amount), call_id=call_id)
    cap_settle(reservation=reservation, actual=Decimal(amount))


def _cap(tenant, thresholds=(50,)) -> SpendingCap:
    return SpendingCap.objects.create(
        tenant=tenant, scope="tenant", period="month", limit_usd=Decimal("1"), alert_thresholds=list(thresholds)
    )


def test_one_alert_per_threshold_under_concurrent_crossings(owner_tenant, nudges):
    cap = _cap(owner_tenant, thresholds=(50, 80, 100))
    reservations = [cap_reserve(subject=Subject(owner_tenant.pk), amount=Decimal("0.05"), call_id=f"c{i}")
                    for i in range(12)]
    barrier = threading.Barrier(len(reservations))

    def settle(reservation):
        barrier.wait()
        try:
            cap_settle(reservation=reservation, actual=Decimal("0.05"))
        finally:
            connection.close()

    threads = [threading.Thread(target=settle, args=(r,)) for r in reservations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    thresholds = list(CapAlert.objects.filter(cap=cap).values_list("threshold", flat=True))
    assert sorted(thresholds) == [50]  # 0.60 spent: 50% crossed once, by whichever thread got there
    assert len(nudges) == 1
    assert cap_alerts_notify() == 1
    assert len(mail.outbox) == 1 and "owner@example.com" in mail.outbox[0].to


def test_crossing_a_threshold_sends_one_email_after_commit(owner_tenant, eager):
    _cap(owner_tenant)
    _spend(owner_tenant, "0.6", "big")  # the nudge runs the sender (in-process here)
    assert len(mail.outbox) == 1
    _spend(owner_tenant, "0.1", "small")  # still past 50%: no second alert
    assert cap_alerts_notify() == 0  # the next beat finds nothing unsent
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["owner@example.com"]
    assert "50%" in mail.outbox[0].subject
    assert CapAlert.objects.get().sent_at is not None


def test_crossing_nudges_a_sender_once_per_commit_that_recorded_alerts(owner_tenant, nudges):
    _cap(owner_tenant)
    _spend(owner_tenant, "0.6", "big")
    _spend(owner_tenant, "0.1", "small")
    assert nudges == [()]
    assert mail.outbox == []  # the nudge went nowhere: the alert waits in the outbox
    assert CapAlert.objects.get().sent_at is None


def test_alert_is_sent_by_the_next_beat_when_the_broker_is_down_at_commit(owner_tenant, broker_down):
    _cap(owner_tenant)
    _spend(owner_tenant, "0.6", "big")  # the booking commits although the nudge failed
    alert = CapAlert.objects.get()
    assert alert.sent_at is None and mail.outbox == []

    assert cap_alerts_notify() == 1  # beat
    assert len(mail.outbox) == 1
    alert.refresh_from_db()
    assert alert.sent_at is not None
    assert cap_alerts_notify() == 0 and len(mail.outbox) == 1


def test_concurrent_senders_send_each_alert_once(owner_tenant, nudges):
    _cap(owner_tenant, thresholds=(10, 20, 30, 40, 50))
    _spend(owner_tenant, "0.6", "big")
    assert CapAlert.objects.filter(sent_at__isnull=True).count() == 5
    senders = 4
    barrier = threading.Barrier(senders)
    counts: list[int] = []

    def send() -> None:
        barrier.wait()
        try:
            counts.append(alerts.alerts_send())
        finally:
            connection.close()

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sum(counts) == 5 and len(counts) == senders
    assert sorted(m.subject.split(": ")[1].split("%")[0] for m in mail.outbox) == ["10", "20", "30", "40", "50"]
    assert not CapAlert.objects.filter(sent_at__isnull=True).exists()


def test_a_claim_left_by_a_dead_sender_is_taken_over_once_stale(owner_tenant, nudges, settings):
    _cap(owner_tenant)
    _spend(owner_tenant, "0.6", "big")
    CapAlert.objects.update(claimed_at=timezone.now())  # a sender claimed it, then died
    assert alerts.alerts_send() == 0  # a live claim is left alone

    CapAlert.objects.update(claimed_at=timezone.now() - timedelta(seconds=settings.CAP_ALERT_CLAIM_SECONDS + 1))
    assert alerts.alerts_send() == 1
    assert len(mail.outbox) == 1


def test_a_failed_send_releases_its_claim_for_the_next_run(owner_tenant, nudges, monkeypatch):
    _cap(owner_tenant)
    _spend(owner_tenant, "0.6", "big")

    def smtp_down(**kwargs):
        raise ConnectionRefusedError("smtp")

    monkeypatch.setattr(alerts, "send_mail", smtp_down)
    with pytest.raises(ConnectionRefusedError):
        alerts.alerts_send()
    assert CapAlert.objects.get().claimed_at is None

    monkeypatch.undo()
    assert cap_alerts_notify() == 1


@pytest.fixture
def unreachable_broker():
    """The real Celery app publishing to a broker nobody listens on (services mode: eager
    mode never reaches a broker, the `broker_down` case stands for it there)."""
    from config.celery import app

    if app.conf.task_always_eager:
        pytest.skip("embedded mode runs tasks in-process: test_alert_is_sent_by_the_next_beat_when_the_broker_is_down_at_commit covers it")
    before = app.conf.broker_url, app.conf.broker_transport_options
    app.pool.force_close_all()
    app._pool = None
    app.conf.broker_url = "redis://127.0.0.1:9/0"
    yield
    app.pool.force_close_all()
    app._pool = None
    app.conf.broker_url, app.conf.broker_transport_options = before


def test_a_real_unreachable_broker_at_commit_loses_no_alert(owner_tenant, unreachable_broker):
    _cap(owner_tenant)
    _spend(owner_tenant, "0.6", "big")  # publishing the nudge fails after commit: logged, not raised
    assert CapAlert.objects.get().sent_at is None and mail.outbox == []
    assert cap_alerts_notify() == 1  # the next beat run
    assert len(mail.outbox) == 1
