"""Observability: Prometheus metrics (`metrics`, served by `exposition`), the request context
every log line carries (`context`), the log formats (`logs`), the ASGI middleware that gives
each request and socket its id and counts what it answers (`asgi`), and Celery's signals
(`celery_signals`).

The bottom layer of the project: every app may call it (the ledger books tokens, the transport
counts retries, the fan-out reports its lag), so it imports no app of Parley."""
