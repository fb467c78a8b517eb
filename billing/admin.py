"""Admin for the price list (global: superusers edit it; tenant admins arrive with the scoped admin)."""

from django.contrib import admin

from .models import ModelPrice


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    list_display = (
        "model",
        "input_per_million",
        "cached_input_per_million",
        "output_per_million",
        "batch_input_per_million",
        "batch_output_per_million",
        "context_window",
        "updated_at",
    )
    search_fields = ("model",)
