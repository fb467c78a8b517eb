"""Celery: task outcomes as metrics, and the request id across the broker — the enqueuing
request's id travels in the message headers and is the task's context on the worker."""

from __future__ import annotations

from typing import Any

from celery import signals

from . import context, metrics

HEADER = "parley_request_id"


def _publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    request_id = context.request_id_current()
    if headers is not None and request_id is not None:
        headers[HEADER] = request_id


def _prerun(task: Any = None, **_: Any) -> None:
    incoming = getattr(getattr(task, "request", None), HEADER, None)
    # Eager (embedded mode): the task runs inside the request that enqueued it, with its id.
    request_id = context.request_id_sane(incoming) or context.request_id_current()
    task.request.parley_context = context.context_start(request_id)


def _postrun(task: Any = None, state: str | None = None, **_: Any) -> None:
    token = getattr(getattr(task, "request", None), "parley_context", None)
    if token is not None:
        try:
            context.context_end(token)
        except ValueError:  # set in another context (eager tasks nest)
            pass
    metrics.task_finished(getattr(task, "name", "unknown"), (state or "unknown").lower())


def connect() -> None:
    signals.before_task_publish.connect(_publish, weak=False)
    signals.task_prerun.connect(_prerun, weak=False)
    signals.task_postrun.connect(_postrun, weak=False)
