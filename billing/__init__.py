"""Prices, the usage ledger, cost; later caps, reservations and rate limits."""
