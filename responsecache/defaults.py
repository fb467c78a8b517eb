"""The embedding model's price row (the semantic cache embeds questions): OpenAI's
text-embedding-3-small at $0.02 per 1M input tokens, kind `embedding`, so chat never offers it."""

from __future__ import annotations

from decimal import Decimal

EMBEDDING_MODEL = "text-embedding-3-small"
EMBEDDING_INPUT_PER_MILLION = Decimal("0.02")


def install_embedding_price(model_price_class) -> None:
    """Create the row if missing; never overwrite a price an admin edited."""
    zero = Decimal(0)
    model_price_class.objects.get_or_create(
        model=EMBEDDING_MODEL, tenant=None,
        defaults={
            "kind": "embedding",
            "input_per_million": EMBEDDING_INPUT_PER_MILLION,
            "cached_input_per_million": EMBEDDING_INPUT_PER_MILLION,
            "output_per_million": zero,
            "batch_input_per_million": EMBEDDING_INPUT_PER_MILLION / 2,
            "batch_output_per_million": zero,
            "context_window": 8191,
        },
    )
