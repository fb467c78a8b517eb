"""App config for tenants."""

from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import freshness
        from .models import ApiKey, EndUser, ProviderCredential, Tenant

        # Cached caller configuration reloads when these change (other apps register theirs).
        freshness.watch(Tenant, tenant="pk", new_rows_change_nothing=True)
        freshness.watch(ApiKey, new_rows_change_nothing=True)
        freshness.watch(EndUser, new_rows_change_nothing=True)
        freshness.watch(ProviderCredential)
