"""App config for the simulator: an app only so that `manage.py run_simulator` is found."""

from django.apps import AppConfig


class SimulatorConfig(AppConfig):
    name = "simulator"
    default_auto_field = "django.db.models.BigAutoField"
