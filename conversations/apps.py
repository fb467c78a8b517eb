"""App config for conversations."""

from django.apps import AppConfig


class ConversationsConfig(AppConfig):
    name = "conversations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The core enqueues summaries through the task module, which calls back into the core:
        # the task is handed to the core here instead of being imported by it.
        from tenants import freshness

        from . import summaries, tasks
        from .models import Assistant

        summaries.summary_task_register(lambda *args: tasks.summarize_conversation.delay(*args))
        freshness.watch(Assistant)  # cached caller configuration holds the default assistant
