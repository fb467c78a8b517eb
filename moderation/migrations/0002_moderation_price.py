"""Price the moderation model at $0 (OpenAI's moderation endpoint is free): priced, not unpriced."""

from django.db import migrations

from moderation.defaults import install_moderation_price


def seed(apps, schema_editor):
    install_moderation_price(apps.get_model("billing", "ModelPrice"))


class Migration(migrations.Migration):
    dependencies = [
        ("moderation", "0001_initial"),
        ("billing", "0002_default_prices"),
    ]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
