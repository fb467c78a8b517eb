"""Log formats: one JSON object per line (services mode, or LOG_FORMAT=json), readable text
otherwise; both carry the request context (`context.ContextFilter`).

Settings call `logging_config` at import time, so this module imports only the standard
library: the formatters are named by dotted path and built by `logging.config`."""

from __future__ import annotations

import logging
from typing import Any

CONTEXT_FIELDS = ("request_id", "tenant_id", "conversation_id", "message_id")


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request_id tenant_id=… conversation_id=… message_id=…] message`."""

    def format(self, record: logging.LogRecord) -> str:
        known = [(name, getattr(record, name, None)) for name in CONTEXT_FIELDS]
        parts = [f"{name}={value}" if name != "request_id" else str(value) for name, value in known if value is not None]
        record.context = f"[{' '.join(parts)}] " if parts else ""
        return super().format(record)


def logging_config(*, json_lines: bool, level: str) -> dict[str, Any]:
    """Django's LOGGING: one console handler, the context filter on it, and the chatty HTTP
    libraries (they log URLs and headers at DEBUG) kept at WARNING."""
    formatters = {
        "text": {
            "()": "observability.logs.TextFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(context)s%(message)s",
        },
        # python-json-logger: every non-standard record attribute (the context, `extra=`) is a key.
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            "timestamp": False,
        },
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "observability.context.ContextFilter"}},
        "formatters": formatters,
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "json" if json_lines else "text",
                "filters": ["context"],
            },
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {name: {"level": "WARNING"} for name in ("openai", "httpx", "httpx2", "httpcore", "httpcore2")},
    }
