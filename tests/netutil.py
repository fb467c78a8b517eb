"""Loopback helpers for tests and benchmarks that start servers: no Django imports."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, alive: Callable[[], bool], timeout: float = 90) -> None:
    """Until something accepts connections on 127.0.0.1:port; RuntimeError if `alive()` turns
    false (the server died) or the time runs out. The bound is generous: a Daphne process
    starting on a loaded 2-core machine has taken over 40 s to import and listen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server for port {port} exited before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def processes_stop(processes: list[subprocess.Popen], timeout: float = 10) -> None:
    """Terminate every process, then wait for each, killing what does not exit in time."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
