"""The OpenAI-compatible Batch API: files, batches, their execution (provider or local) and billing."""
