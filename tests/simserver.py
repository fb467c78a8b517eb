"""Serve the upstream simulator over real HTTP from a background thread, on a free loopback port.

    with SimulatorServer() as sim:
        client = openai.OpenAI(base_url=sim.base_url, api_key="sk-test")
        ...
        assert sim.app.stats.completions == 1
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn

from simulator import Simulator, create_app


class SimulatorServer:
    """uvicorn serving one Simulator on 127.0.0.1; ``app`` is it, for its stats and faults."""

    def __init__(self, app: Simulator | None = None, *, ttft_ms: float = 0,
                 tokens_per_second: float = 0) -> None:
        self.app = app if app is not None else create_app(
            ttft_ms=ttft_ms, tokens_per_second=tokens_per_second)
        self.host = "127.0.0.1"
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """What the SDK takes as ``base_url``."""
        return f"{self.url}/v1"

    def start(self, timeout: float = 10.0) -> SimulatorServer:
        config = uvicorn.Config(
            self.app, loop="asyncio", log_level="warning", log_config=None, access_log=False,
            lifespan="on",
            # A hung request whose client never left must not block stop() for long.
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        # Binding here, before the thread starts, means the port is known and nothing can take it.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]},
            name=f"simulator:{self.port}", daemon=True,
        )
        self._thread.start()
        self._wait_started(timeout)
        return self

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self._server and self._server.started):
            if not (self._thread and self._thread.is_alive()) or time.monotonic() > deadline:
                raise RuntimeError("the simulator did not start")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
