"""Daphne exactly as the `daphne` command runs it, plus TCP_NODELAY on every connection, a
dropped connection when an application fails after its response started, and a graceful
shutdown on SIGTERM (conversations/shutdown.py).

    python -m config.daphne -b 0.0.0.0 -p 8000 config.asgi:application   # any daphne arguments

Twisted, Daphne's network layer, leaves Nagle's algorithm on for accepted connections. A token
stream is many small writes: with Nagle on, each write after the first waits until the client
has acknowledged the one before, and a client that delays its ACKs (Linux: up to 40 ms) turns
a smooth stream into bursts. `bench/proxy_overhead.py --stock-daphne` shows the effect. uvicorn
needs none of this: asyncio sets TCP_NODELAY on its TCP transports.

An application that raises after its response started (a stream that breaks half-way, the
simulator's `cut`) gets, from stock Daphne, an attempt at a 500 over the started response: that
raises in Daphne's application checker, which then never runs again (no more reaping or
close timeouts in the process), and the connection stays open until the client's read timeout.
Here the connection is closed instead, without the end of the chunked body, as uvicorn does: the
client sees the cut at once.
"""

from __future__ import annotations

from typing import Any


def nodelay_install() -> None:
    """Make every TCP connection Twisted accepts from now on send small writes at once."""
    from twisted.internet import tcp

    accept = tcp.Server.__init__
    if getattr(accept, "parley_nodelay", False):
        return

    def __init__(self: tcp.Server, *args: Any, **kwargs: Any) -> None:
        accept(self, *args, **kwargs)
        self.setTcpNoDelay(True)

    __init__.parley_nodelay = True  # type: ignore[attr-defined]
    tcp.Server.__init__ = __init__  # type: ignore[method-assign]


def late_failure_close_install() -> None:
    """Close the connection of a request whose application raised after its response started."""
    from daphne.http_protocol import WebRequest

    handle = WebRequest.handle_exception
    if getattr(handle, "parley_close", False):
        return

    def handle_exception(self: WebRequest, exception: BaseException) -> None:
        if not self._response_started:
            return handle(self, exception)  # a 500 page, as Daphne answers
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()  # what was written is flushed first
        return None

    handle_exception.parley_close = True  # type: ignore[attr-defined]
    WebRequest.handle_exception = handle_exception  # type: ignore[method-assign]


def graceful_shutdown_install() -> None:
    """SIGTERM drains the process (conversations/shutdown.py) before the reactor stops; a
    second SIGTERM (or SIGINT) stops it at once."""
    import daphne.server  # noqa: F401 — installs the asyncio reactor first
    from twisted.internet import reactor

    stop = reactor.sigTerm
    state = {"draining": False}

    def sig_term(number: int, frame: Any = None) -> None:
        if state["draining"]:
            return stop(number, frame)
        state["draining"] = True
        reactor.callFromThread(_drain_then_stop, reactor)

    reactor.sigTerm = sig_term  # read when the reactor installs its signal handlers


def _drain_then_stop(reactor: Any) -> None:
    import asyncio

    from django.conf import settings

    from conversations import shutdown

    task = asyncio.ensure_future(shutdown.drain(grace=settings.SHUTDOWN_GRACE_SECONDS))
    task.add_done_callback(lambda _: reactor.stop())


def main() -> None:
    nodelay_install()
    late_failure_close_install()
    graceful_shutdown_install()
    from daphne.cli import CommandLineInterface

    CommandLineInterface.entrypoint()  # reads sys.argv like `daphne`


if __name__ == "__main__":
    main()
