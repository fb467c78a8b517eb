"""`GET /metrics`: the Prometheus text format, for a scraper holding METRICS_TOKEN (or, with no
token set, for a client on this machine that came through no proxy).

Multi-process mode (PROMETHEUS_MULTIPROC_DIR): the values of every process that wrote to the
directory, summed per series (gauges: live processes only); otherwise this process's registry.
Queue depth is read at scrape time (Redis LLEN of Celery's queues) in services mode."""

from __future__ import annotations

import hmac
import ipaddress
import logging

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import metrics

logger = logging.getLogger(__name__)

PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED", "HTTP_X_REAL_IP")


class QueueDepthCollector:
    """`parley_celery_queue_length{queue}`: messages waiting in each Celery queue (a Redis list)."""

    def collect(self):
        family = GaugeMetricFamily("parley_celery_queue_length", "Messages waiting in a Celery queue", labels=["queue"])
        if settings.REDIS_URL and not settings.CELERY_TASK_ALWAYS_EAGER:
            try:
                import redis

                from config.redis_options import redis_options

                client = redis.Redis.from_url(settings.CELERY_BROKER_URL, **redis_options(asynchronous=False))
                try:
                    for queue in settings.METRICS_CELERY_QUEUES:
                        family.add_metric([queue], client.llen(queue))
                finally:
                    client.close()
            except Exception:  # noqa: BLE001 — Redis away: the scrape still answers
                logger.warning("celery queue depth not read", exc_info=True)
        yield family


_queue_depth = QueueDepthCollector()
if not metrics.MULTIPROCESS:
    REGISTRY.register(_queue_depth)


def registry() -> CollectorRegistry:
    if not metrics.MULTIPROCESS:
        return REGISTRY
    from prometheus_client import multiprocess

    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)
    combined.register(_queue_depth)
    return combined


def _loopback_direct(request: HttpRequest) -> bool:
    try:
        loopback = ipaddress.ip_address(request.META.get("REMOTE_ADDR", "")).is_loopback
    except ValueError:
        return False
    return loopback and not any(header in request.META for header in PROXY_HEADERS)


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    token = settings.METRICS_TOKEN
    if token:
        given = request.META.get("HTTP_AUTHORIZATION", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            response = HttpResponse("unauthorized\n", status=401, content_type="text/plain")
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    elif not _loopback_direct(request):
        return HttpResponse("not found\n", status=404, content_type="text/plain")
    return HttpResponse(generate_latest(registry()), content_type=CONTENT_TYPE_LATEST)
