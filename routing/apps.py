"""App config for routing."""

from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from tenants import freshness

        from .models import ModelAlias

        freshness.watch(ModelAlias)  # `/v1` admission caches each tenant's aliases
