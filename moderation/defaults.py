"""The moderation model's price row: OpenAI's moderation endpoint is free, and priced at $0 here
so that it is priced, not "free by omission" (a model without a price is refused)."""

from __future__ import annotations

from decimal import Decimal

from llm.moderation import MODERATION_MODEL


def install_moderation_price(model_price_class) -> None:
    """Create the $0 row if missing; never overwrite a price an admin edited."""
    zero = Decimal(0)
    # Migrations pass the model as it was then: `kind` arrived in billing's 0004.
    kind = {"kind": "moderation"} if any(f.name == "kind" for f in model_price_class._meta.fields) else {}
    model_price_class.objects.get_or_create(
        model=MODERATION_MODEL,
        defaults={
            **kind,
            "input_per_million": zero,
            "cached_input_per_million": zero,
            "output_per_million": zero,
            "batch_input_per_million": zero,
            "batch_output_per_million": zero,
        },
    )
