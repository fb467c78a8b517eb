"""App config for the response cache."""

from django.apps import AppConfig


class ResponseCacheConfig(AppConfig):
    name = "responsecache"
    verbose_name = "Response cache"
    default_auto_field = "django.db.models.BigAutoField"
