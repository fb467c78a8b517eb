"""Seed the product brief's default prices (editable in the admin afterwards)."""

from decimal import Decimal

from django.db import migrations

# model: (input, output, context window) per 1M tokens. Cached input at half the input
# price; Batch API at 50% off both.
DEFAULTS = {
    "gpt-4o": ("3.75", "15.00", 128_000),
    "gpt-4o-mini": ("0.30", "1.20", 128_000),
    "gpt-4-turbo": ("10.00", "30.00", 128_000),
    "gpt-3.5-turbo": ("0.50", "1.50", 16_385),
}


def seed(apps, schema_editor):
    ModelPrice = apps.get_model("billing", "ModelPrice")
    half = Decimal("0.5")
    for model, (inp, out, window) in DEFAULTS.items():
        inp, out = Decimal(inp), Decimal(out)
        ModelPrice.objects.update_or_create(
            model=model,
            defaults={
                "input_per_million": inp,
                "cached_input_per_million": inp * half,
                "output_per_million": out,
                "batch_input_per_million": inp * half,
                "batch_output_per_million": out * half,
                "context_window": window,
            },
        )


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
