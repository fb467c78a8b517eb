"""The Prometheus metrics, and the one function per fact that the rest of Parley calls.

Multi-process safe: with `PROMETHEUS_MULTIPROC_DIR` set in the environment (before the
process starts: prometheus_client reads it at import), every Daphne and Celery process writes
its values to files there and `/metrics` (`exposition`) sums them; without it (embedded mode)
the process's own registry is served. Labels stay bounded: surfaces, status and error codes,
models and provider hosts (the operator's price list and credentials), Celery task names, and
tenants only as named in METRICS_TENANT_LABELS (every other tenant is "other").

Callers never see prometheus_client: they call `request_answered`, `usage_booked`,
`cache_hit`, … here, and a failing metric never fails what it measures."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from decimal import Decimal
from urllib.parse import urlsplit

from django.conf import settings
from prometheus_client import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
OTHER = "other"

# Error codes a surface answers with (the chat protocol's and OpenAI's on /v1): anything else
# is counted as "other", so a provider's own code cannot grow the label set.
ERROR_CODES = frozenset({
    "invalid_request", "unauthorized", "not_found", "rate_limited", "spending_cap_exceeded",
    "moderation_blocked", "upstream_error", "upstream_timeout", "cancelled",
    "invalid_api_key", "model_not_found", "service_unavailable",
})
REFUSALS = {"rate_limited": "rate_limit", "spending_cap_exceeded": "spending_cap"}

REQUESTS = Counter("parley_requests_total", "HTTP responses and socket handshakes, by surface and status code",
                   ["surface", "code"])
ERRORS = Counter("parley_errors_total", "Errors answered (bodies, socket frames, in-stream events), by surface and "
                 "error code", ["surface", "code"])
REFUSED = Counter("parley_refusals_total", "Calls refused by a spending cap or a rate limit", ["reason", "tenant"])
UPSTREAM_ERRORS = Counter("parley_upstream_errors_total", "Failed upstream attempts, by provider host and kind "
                          "(HTTP status, timeout, connection, other)", ["host", "kind"])
UPSTREAM_RETRIES = Counter("parley_upstream_retries_total", "Upstream attempts retried, by provider host", ["host"])
TTFT = Histogram("parley_time_to_first_token_seconds", "Upstream calls' time to first token, from the ledger",
                 ["model"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))
CALL_SECONDS = Histogram("parley_upstream_call_seconds", "Upstream calls' total duration, from the ledger",
                         ["model"], buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
GENERATION_SECONDS = Histogram("parley_generation_seconds", "Whole generations (a turn with its tool rounds; a /v1 "
                               "call), by surface", ["surface"], buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
CALLS = Counter("parley_upstream_calls_total", "Ledger rows booked, by model and kind", ["model", "kind", "tenant"])
TOKENS = Counter("parley_tokens_total", "Tokens booked in the ledger, by model and type (prompt includes cached)",
                 ["model", "type", "tenant"])
COST = Counter("parley_cost_usd_total", "USD booked in the ledger, by model", ["model", "tenant"])
ACTIVE = Gauge("parley_generations_active", "Generations running (chat turns, /v1 calls)", ["surface"],
               multiprocess_mode="livesum")
SOCKETS = Gauge("parley_sockets_open", "WebSockets open", multiprocess_mode="livesum")
LAG = Gauge("parley_event_log_lag_entries", "The most entries any socket or SSE reader of this process has waiting "
            "in its fan-out buffer", multiprocess_mode="livemax")
CACHE_HITS = Counter("parley_response_cache_hits_total", "Response-cache hits, by kind", ["kind"])
TASKS = Counter("parley_celery_tasks_total", "Celery task outcomes", ["task", "outcome"])


def _safely(fn):
    """A metric must never fail the work it measures."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            logger.warning("metric %s not recorded", fn.__name__, exc_info=True)
            return None

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# --- tenants as labels --------------------------------------------------------------------

_tenant_slugs: tuple[float, dict[int, str]] = (0.0, {})
TENANT_LABELS_TTL = 60.0


def tenant_label(tenant_id: int | None) -> str:
    """The tenant's slug when METRICS_TENANT_LABELS names it, else "other". Synchronous (it may
    read the slugs' ids, once a minute); on an event loop use `tenant_label_cached`."""
    global _tenant_slugs
    if tenant_id is None or not settings.METRICS_TENANT_LABELS:
        return OTHER
    expires, slugs = _tenant_slugs
    if time.monotonic() >= expires:
        from django.apps import apps  # a read of slugs; observability imports no app

        tenant = apps.get_model("tenants", "Tenant")
        slugs = dict(tenant.objects.filter(slug__in=settings.METRICS_TENANT_LABELS).values_list("id", "slug"))
        _tenant_slugs = (time.monotonic() + TENANT_LABELS_TTL, slugs)
    return slugs.get(tenant_id, OTHER)


def tenant_label_cached(tenant_id: int | None) -> str | None:
    """`tenant_label` without a database read: None when the slugs must be read first."""
    if tenant_id is None or not settings.METRICS_TENANT_LABELS:
        return OTHER
    expires, slugs = _tenant_slugs
    return slugs.get(tenant_id, OTHER) if time.monotonic() < expires else None


def tenant_labels_forget() -> None:
    global _tenant_slugs
    _tenant_slugs = (0.0, {})


# --- the facts ----------------------------------------------------------------------------


@_safely
def request_answered(surface: str, code: int | str) -> None:
    REQUESTS.labels(surface, str(code)).inc()


@_safely
def error_answered(surface: str, code: str, *, tenant: str = OTHER) -> None:
    code = code if code in ERROR_CODES else OTHER
    ERRORS.labels(surface, code).inc()
    if code in REFUSALS:
        REFUSED.labels(REFUSALS[code], tenant).inc()


def provider_host(base_url: str) -> str:
    return urlsplit(base_url).hostname or OTHER


@_safely
def upstream_failed(base_url: str, kind: str, *, retried: bool) -> None:
    host = provider_host(base_url)
    UPSTREAM_ERRORS.labels(host, kind).inc()
    if retried:
        UPSTREAM_RETRIES.labels(host).inc()


@_safely
def usage_booked(*, tenant_id: int, model: str, kind: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int, cost_usd: Decimal, ttft_ms: int | None, latency_ms: int | None) -> None:
    """One ledger row was written (billing.services.usage_record, once committed)."""
    tenant = tenant_label(tenant_id)
    CALLS.labels(model, kind, tenant).inc()
    TOKENS.labels(model, "prompt", tenant).inc(prompt_tokens)
    TOKENS.labels(model, "completion", tenant).inc(completion_tokens)
    TOKENS.labels(model, "cached", tenant).inc(cached_tokens)
    COST.labels(model, tenant).inc(float(cost_usd))
    if ttft_ms is not None:
        TTFT.labels(model).observe(ttft_ms / 1000)
    if latency_ms is not None:
        CALL_SECONDS.labels(model).observe(latency_ms / 1000)


@contextlib.contextmanager
def generation_running(surface: str) -> Iterator[None]:
    """Around a generation (or a /v1 call): the active gauge and the duration histogram."""
    started = time.monotonic()
    _gauge_add(ACTIVE.labels(surface), 1)
    try:
        yield
    finally:
        _gauge_add(ACTIVE.labels(surface), -1)
        _observe(GENERATION_SECONDS.labels(surface), time.monotonic() - started)


@_safely
def generation_started(surface: str) -> float:
    ACTIVE.labels(surface).inc()
    return time.monotonic()


@_safely
def generation_ended(surface: str, started: float) -> None:
    ACTIVE.labels(surface).dec()
    GENERATION_SECONDS.labels(surface).observe(time.monotonic() - started)


@_safely
def _gauge_add(gauge, amount: float) -> None:
    gauge.inc(amount)


@_safely
def _observe(histogram, value: float) -> None:
    histogram.observe(value)


@_safely
def socket_opened() -> None:
    SOCKETS.inc()


@_safely
def socket_closed() -> None:
    SOCKETS.dec()


@_safely
def event_log_lag(entries: int) -> None:
    LAG.set(entries)


@_safely
def cache_hit(kind: str) -> None:
    """A response-cache hit (kind: e.g. "exact"); the response cache calls this."""
    CACHE_HITS.labels(kind).inc()


@_safely
def task_finished(task: str, outcome: str) -> None:
    TASKS.labels(task, outcome).inc()


def process_exit_hook() -> None:
    """Multi-process mode: a process that exits takes its live gauges (sockets, generations,
    lag) out of the sums."""
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        atexit.register(multiprocess.mark_process_dead, os.getpid())
