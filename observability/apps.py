from django.apps import AppConfig


class ObservabilityConfig(AppConfig):
    name = "observability"
    label = "observability"

    def ready(self) -> None:
        from . import celery_signals, metrics

        celery_signals.connect()
        metrics.process_exit_hook()
