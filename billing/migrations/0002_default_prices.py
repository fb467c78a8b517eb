"""Seed the product brief's default prices (editable in the admin afterwards)."""

from django.db import migrations

from billing.defaults import install_default_prices


def seed(apps, schema_editor):
    install_default_prices(apps.get_model("billing", "ModelPrice"))


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_initial")]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
