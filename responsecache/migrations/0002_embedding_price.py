"""Price the semantic cache's embedding model (text-embedding-3-small, $0.02 per 1M input)."""

from django.db import migrations

from responsecache.defaults import install_embedding_price


def seed(apps, schema_editor):
    install_embedding_price(apps.get_model("billing", "ModelPrice"))


class Migration(migrations.Migration):
    dependencies = [
        ("responsecache", "0001_initial"),
        ("billing", "0009_embedding_kind"),
    ]
    operations = [migrations.RunPython(seed, migrations.RunPython.noop)]
