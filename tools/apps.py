"""App config for tools."""

from django.apps import AppConfig


class ToolsConfig(AppConfig):
    name = "tools"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Importing builtins registers the built-in tools; their names are handed down to the
        # model's name validator (models must not import the registry above it).
        from . import builtins, models, registry

        assert builtins.__name__
        models.builtin_names_source(lambda: registry.BUILTINS)
