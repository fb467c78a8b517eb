"""App config for moderation."""

from django.apps import AppConfig


class ModerationConfig(AppConfig):
    name = "moderation"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from tenants import freshness

        from .models import ModerationPolicy

        freshness.watch(ModerationPolicy)  # cached caller configuration holds the policy
