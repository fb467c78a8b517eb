"""Mark the moderation model's price row as a moderation price: chat surfaces never offer it."""

from django.db import migrations

from llm.moderation import MODERATION_MODEL


def mark(apps, schema_editor):
    apps.get_model("billing", "ModelPrice").objects.filter(model=MODERATION_MODEL).update(kind="moderation")


class Migration(migrations.Migration):
    dependencies = [
        ("moderation", "0002_moderation_price"),
        ("billing", "0004_model_price_kind"),
    ]
    operations = [migrations.RunPython(mark, migrations.RunPython.noop)]
