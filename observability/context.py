"""The request context: the id of a request, socket frame or generation, and the tenant,
conversation and message it concerns, carried by every log line (`ContextFilter`) and every
error body.

One mutable `LogContext` per request (or socket frame) in a ContextVar: tasks and threads the
request starts copy the variable and so share the object, and what a later step learns (the
tenant once authenticated, the conversation once the turn is admitted) is seen by every line
after it, the middleware's included."""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from dataclasses import dataclass, fields
from typing import Any

# What an incoming X-Request-ID may be: a proxy's or a client's id, short and printable.
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@dataclass
class LogContext:
    request_id: str
    tenant_id: int | None = None
    conversation_id: str | None = None
    message_id: str | None = None

    def items(self) -> list[tuple[str, Any]]:
        return [(f.name, getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None]


_current: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar("parley_log_context", default=None)


def request_id_new() -> str:
    return uuid.uuid4().hex


def request_id_sane(value: str | bytes | None) -> str | None:
    """The incoming id when it is a sane one (letters, digits, `._:-`, at most 64), else None."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    return value if value and _SANE_ID.fullmatch(value) else None


def context_start(request_id: str | None = None, **known: Any) -> contextvars.Token:
    """A new context for what this task does from now on (a request, a frame, a Celery task)."""
    return _current.set(LogContext(request_id=request_id or request_id_new(), **known))


def context_use(current: LogContext | None) -> contextvars.Token:
    return _current.set(current)


def context_end(token: contextvars.Token) -> None:
    _current.reset(token)


def context_bind(**known: Any) -> None:
    """Add what became known (tenant_id, conversation_id, message_id) to the current context;
    outside any request (a sweep, a shell) there is none and nothing is bound."""
    current = _current.get()
    if current is None:
        return
    for name, value in known.items():
        if value is not None:
            setattr(current, name, value if name == "tenant_id" else str(value))


def context_current() -> LogContext | None:
    return _current.get()


def request_id_current() -> str | None:
    current = _current.get()
    return current.request_id if current is not None else None


class ContextFilter(logging.Filter):
    """Puts the current context's fields on every record (a handler filter: it sees the records
    of every logger, the libraries' too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = _current.get()
        if current is not None:
            for name, value in current.items():
                setattr(record, name, value)
        return True
