"""`manage.py rotate_encryption_keys`: re-encrypt every stored secret with the first FIELD_ENCRYPTION_KEYS key."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand
from django.db import models
from django.db.models import Value
from django.db.models.functions import Cast

from tenants.audit import audit_record
from tenants.crypto import EncryptedTextField, rotate

BATCH = 500


def encrypted_fields() -> Iterator[tuple[type[models.Model], str]]:
    """Every (model, field name) stored with EncryptedTextField, in every installed app."""
    for model in apps.get_models():
        for field in model._meta.concrete_fields:
            if isinstance(field, EncryptedTextField):
                yield model, field.name


def rotate_field(model: type[models.Model], name: str) -> int:
    """Rotate one column. The raw ciphertext is read and written past the field (a Cast on the
    way out, a typed Value on the way in), so no plaintext is ever materialised; the update is
    conditional on the old ciphertext, so a key saved meanwhile is never overwritten."""
    raw = model._default_manager.annotate(_raw=Cast(name, models.TextField())).exclude(_raw="")
    rotated = 0
    for pk, token in raw.filter(_raw__isnull=False).order_by("pk").values_list("pk", "_raw").iterator(chunk_size=BATCH):
        new_value = Value(rotate(token), output_field=models.TextField())
        rotated += raw.filter(pk=pk, _raw=token).update(**{name: new_value})
    return rotated


class Command(BaseCommand):
    help = "Re-encrypt every encrypted secret with the first key of FIELD_ENCRYPTION_KEYS."

    def handle(self, *args: Any, **options: Any) -> None:
        total = sum(rotate_field(model, name) for model, name in encrypted_fields())
        audit_record(
            tenant_id=None, action="encryption.rotate", actor_label="manage.py rotate_encryption_keys",
            changes={"rotated": total},
        )
        self.stdout.write(json.dumps({"rotated": total}))
