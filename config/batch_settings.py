"""The Batch API's settings (batches/), from the environment; star-imported by config.settings.

The largest input file (stored in the database), the most lines a batch may have, the
max_tokens a line without one is given (and held for), how often a running batch is polled
(beat, and a retrieve), how many lines a worker runs at once when the provider has no Batch
API, how long one task runs lines before handing over, and how long a worker's claim on a
batch lasts (a dead worker's batch is resumed after it)."""

import environ

env = environ.Env()

BATCH_FILE_MAX_BYTES = env.int("BATCH_FILE_MAX_BYTES", default=20 * 1024 * 1024)
BATCH_MAX_LINES = env.int("BATCH_MAX_LINES", default=10_000)
BATCH_DEFAULT_MAX_TOKENS = env.int("BATCH_DEFAULT_MAX_TOKENS", default=1024)
BATCH_POLL_SECONDS = env.float("BATCH_POLL_SECONDS", default=30.0)
BATCH_LOCAL_CONCURRENCY = env.int("BATCH_LOCAL_CONCURRENCY", default=4)
BATCH_RUN_SECONDS = env.float("BATCH_RUN_SECONDS", default=60.0)
BATCH_CLAIM_SECONDS = env.float("BATCH_CLAIM_SECONDS", default=300.0)

__all__ = [name for name in dir() if name.startswith("BATCH_")]
