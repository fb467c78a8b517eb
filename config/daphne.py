"""Daphne exactly as the `daphne` command runs it, plus TCP_NODELAY on every connection.

    python -m config.daphne -b 0.0.0.0 -p 8000 config.asgi:application   # any daphne arguments

Twisted, Daphne's network layer, leaves Nagle's algorithm on for accepted connections. A token
stream is many small writes: with Nagle on, each write after the first waits until the client
has acknowledged the one before, and a client that delays its ACKs (Linux: up to 40 ms) turns
a smooth stream into bursts. `bench/proxy_overhead.py --stock-daphne` shows the effect. uvicorn
needs none of this: asyncio sets TCP_NODELAY on its TCP transports.
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


def main() -> None:
    nodelay_install()
    from daphne.cli import CommandLineInterface

    CommandLineInterface.entrypoint()  # reads sys.argv like `daphne`


if __name__ == "__main__":
    main()
