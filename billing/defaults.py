"""The product brief's default prices and context windows, installed by a migration and editable
in the admin afterwards."""

from __future__ import annotations

from decimal import Decimal

# model: (input, output) USD per 1M tokens, context window. Cached input costs half the input
# price; the Batch API is 50% off both.
DEFAULT_PRICES: dict[str, tuple[str, str, int]] = {
    "gpt-4o": ("3.75", "15.00", 128_000),
    "gpt-4o-mini": ("0.30", "1.20", 128_000),
    "gpt-4-turbo": ("10.00", "30.00", 128_000),
    "gpt-3.5-turbo": ("0.50", "1.50", 16_385),
}


def default_price_rows() -> dict[str, dict[str, object]]:
    half = Decimal("0.5")
    rows = {}
    for model, (inp, out, window) in DEFAULT_PRICES.items():
        i, o = Decimal(inp), Decimal(out)
        rows[model] = {
            "input_per_million": i,
            "cached_input_per_million": i * half,
            "output_per_million": o,
            "batch_input_per_million": i * half,
            "batch_output_per_million": o * half,
            "context_window": window,
        }
    return rows


def install_default_prices(model_price_class) -> None:
    """Create missing default rows; never overwrite a price an admin edited."""
    for model, fields in default_price_rows().items():
        model_price_class.objects.get_or_create(model=model, defaults=fields)
