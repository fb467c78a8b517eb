"""Browser tests: Debian's chromium (never a downloaded browser) driven by pytest-playwright
against the real server (`parley`: Daphne in services mode, uvicorn in-process embedded) and
the simulator. One server and one browser for the whole session; a context per test."""

from __future__ import annotations

import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.test import Client
from playwright.sync_api import expect

from tenants.services import owner_add

CHROMIUM = os.environ.get("PARLEY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SLOW = "[[sim:words=60 tps=12]]"  # about five seconds of streaming: time to watch it, stop it, join it


def _is_browser_test(item: pytest.Item) -> bool:
    return "tests/browser/" in str(item.fspath).replace(os.sep, "/")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Last: Playwright's sync API keeps its event loop running in the main thread from the
    # first browser test to the end of the session, which no other test could live with.
    items.sort(key=_is_browser_test)
    if Path(CHROMIUM).exists():
        return
    skip = pytest.mark.skip(reason=f"no chromium binary at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    for item in filter(_is_browser_test, items):
        item.add_marker(skip)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_FLAGS, "headless": True}


@pytest.fixture(scope="session", autouse=True)
def _browser_settings() -> None:
    # A loaded 2-core CI machine: a first token can take seconds.
    expect.set_options(timeout=20_000)
    # Playwright's loop runs in this thread (see above); the tests' own ORM calls are plain
    # synchronous ones all the same (the server runs in another thread or process).
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"


@pytest.fixture
def console_errors(page) -> list[str]:
    """Every console error and uncaught exception of the test's page."""
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


def member_login(context, parley, tenant) -> None:
    """A tenant owner's session cookie in the browser context."""
    membership = owner_add(tenant=tenant, email=f"owner@{tenant.slug}.test", password="pw-123456789")
    client = Client()
    client.force_login(membership.user)
    context.add_cookies([{"name": "sessionid", "value": client.cookies["sessionid"].value, "url": parley.url}])


class HostSite:
    """Another origin: a tiny HTTP server on 127.0.0.2 (not one of the operator's hosts)
    serving the pages a test puts in `pages`."""

    host = "127.0.0.2"

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        pages = self.pages

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = pages.get(self.path.split("?")[0])
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.end_headers()
                self.wfile.write((body or "not found").encode())

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((self.host, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"


@pytest.fixture(scope="session")
def host_site() -> Iterator[HostSite]:
    site = HostSite()
    site.thread.start()
    yield site
    site.server.shutdown()
