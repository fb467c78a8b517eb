"""App config for billing."""

from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The composition root: the core records alerts, the task sends them; the core learns
        # of the task here instead of importing it (billing.alerts must not import tasks).
        from tenants import freshness

        from . import alerts, tasks
        from .models import ModelPrice, SpendingCap

        alerts.sender_register(tasks.cap_alerts_nudge)
        # Cached caller configuration holds caps and prices; a global price (tenant None) is
        # every tenant's, a tenant's own price that tenant's alone.
        freshness.watch(SpendingCap)
        freshness.watch(ModelPrice)
