"""A tenant's own prices: written by its owners and admins (REST, admin), each write audited.

A tenant's row overrides the global price of that model for that tenant only
(`services.price_for`); an explicit zero prices a self-hosted model at $0.
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction

from tenants.audit import audit_record

from .models import ModelPrice


class PriceTaken(Exception):
    """The tenant already prices this model (change it instead)."""


def price_create(*, tenant_id: int, fields: dict[str, Any], actor_label: str) -> ModelPrice:
    """Raises PriceTaken when the tenant already has a row for the model. Unset cached-input
    and batch prices default to the input and output prices (no discount assumed)."""
    fields = {
        "cached_input_per_million": fields["input_per_million"],
        "batch_input_per_million": fields["input_per_million"],
        "batch_output_per_million": fields["output_per_million"],
        **fields,
    }
    try:
        with transaction.atomic():
            row = ModelPrice.objects.create(tenant_id=tenant_id, **fields)
            audit_record(tenant_id=tenant_id, action="price.create", actor_label=actor_label, obj=row,
                         changes=sorted(fields))
    except IntegrityError:
        raise PriceTaken(f"this tenant already prices {fields['model']!r}") from None
    return row


def price_update(*, row: ModelPrice, fields: dict[str, Any], actor_label: str) -> ModelPrice:
    changed = sorted(name for name, value in fields.items() if getattr(row, name) != value)
    for name, value in fields.items():
        setattr(row, name, value)
    with transaction.atomic():
        row.save()  # a full save: the tenant's configuration version moves (tenants.freshness)
        audit_record(tenant_id=row.tenant_id, action="price.change", actor_label=actor_label, obj=row, changes=changed)
    return row


def price_delete(*, row: ModelPrice, actor_label: str) -> None:
    """The tenant falls back on the global price, or — none — calls to the model are refused."""
    with transaction.atomic():
        audit_record(tenant_id=row.tenant_id, action="price.delete", actor_label=actor_label, obj=row)
        row.delete()


class PriceNotFound(Exception):
    """The tenant has no price of its own for this model (global rows are not its to change)."""


def access_tenant_price(*, tenant_id: int, model: str) -> ModelPrice:
    """The tenant's own row for the model; raises PriceNotFound (another tenant's row is a missing one)."""
    row = ModelPrice.objects.filter(tenant_id=tenant_id, model=model).first()
    if row is None:
        raise PriceNotFound(f"this tenant has no price of its own for {model!r}")
    return row
