"""App config for tools."""

from django.apps import AppConfig


class ToolsConfig(AppConfig):
    name = "tools"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import builtins  # noqa: F401 — registers the built-in tools
