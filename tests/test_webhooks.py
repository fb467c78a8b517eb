"""Webhook tools against a real local HTTP(S) server: signing, failures as tool errors, the address guard."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore2
import pytest
from channels.db import database_sync_to_async

from tenants import egress
from tenants.egress import address_refusal
from tools.calls import ToolCallRequest, ToolContext
from tools.execution import tool_calls_execute
from tools.models import WebhookTool
from tools.services import webhook_tool_create
from tools.webhooks import MAX_RESPONSE_BYTES, WebhookTarget

pytestmark = pytest.mark.django_db(transaction=True)

PARAMETERS = {
    "type": "object",
    "properties": {"order_id": {"type": "integer"}},
    "required": ["order_id"],
}


# --- a real HTTP server ---------------------------------------------------------------------


class Hook(BaseHTTPRequestHandler):
    """Answers by path: /ok echoes, the others misbehave in one way each."""

    protocol_version = "HTTP/1.1"
    server: HookServer

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers.items()), "body": body})
        route = getattr(self, "route_" + self.path.strip("/").replace("-", "_"), None)
        if route is None:
            return self.reply(404, b"{}")
        route(body)

    def reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def route_ok(self, body: bytes) -> None:
        arguments = json.loads(body)["arguments"]
        self.reply(200, json.dumps({"order": arguments.get("order_id"), "status": "shipped"}).encode(),
                   "application/json; charset=utf-8")

    def route_slow(self, body: bytes) -> None:
        time.sleep(2)
        self.reply(200, b'{"late": true}')

    def route_fail(self, body: bytes) -> None:
        self.reply(500, b'{"error": "internal"}')

    def route_text(self, body: bytes) -> None:
        self.reply(200, b"shipped", "text/plain")

    def route_bad_json(self, body: bytes) -> None:
        self.reply(200, b'{"status": shipped')

    def route_big(self, body: bytes) -> None:
        self.reply(200, json.dumps({"blob": "x" * (MAX_RESPONSE_BYTES + 10)}).encode())

    def route_big_stream(self, body: bytes) -> None:
        """No Content-Length: the size is only known by reading, chunk after chunk."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b" " * 16384
        try:
            for _ in range(256):  # 4 MiB if nobody stops reading
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.server.aborted.set()  # the client hung up: good

    def route_redirect(self, body: bytes) -> None:
        self.send_response(307)
        self.send_header("Location", "/ok")
        self.send_header("Content-Length", "0")
        self.end_headers()


class HookServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Hook)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.requests: list[dict[str, Any]] = []
        self.aborted = threading.Event()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="module")
def server():
    running = HookServer()
    yield running
    running.close()


@pytest.fixture(autouse=True)
def _local_webhooks(settings, server):
    """Tests opt in to loopback and plain http, explicitly; production has both off."""
    settings.TOOLS_WEBHOOK_ALLOW_PRIVATE = True
    settings.TOOLS_WEBHOOK_ALLOW_HTTP = True
    server.requests.clear()
    server.aborted.clear()


@pytest.fixture
def tenant(tenant_factory):
    return tenant_factory().tenant


def make_hook(tenant, path: str, *, name: str = "order_status", host: str = "127.0.0.1", port: int, **options) -> WebhookTool:
    return webhook_tool_create(
        tenant=tenant,
        name=name,
        description="Where an order is.",
        parameters=PARAMETERS,
        url=f"http://{host}:{port}{path}",
        **options,
    )


async def hook(*args: Any, **kwargs: Any) -> WebhookTool:
    return await database_sync_to_async(make_hook)(*args, **kwargs)


async def call(tenant_id: int, name: str = "order_status", arguments: str = '{"order_id": 42}'):
    context = ToolContext(conversation_id="6f1c1d7e-0000-4000-8000-000000000001", end_user_external_id="user-7",
                          tenant_id=tenant_id)
    [outcome] = await tool_calls_execute(
        tenant_id=tenant_id, calls=[ToolCallRequest("call_1", name, arguments)], context=context, names=[name]
    )
    return outcome


# The recipe from tools/webhooks.py's docstring, as a tenant would paste it.
def parley_call_verified(secret: str, headers, body: bytes, tolerance: int = 300) -> bool:
    timestamp = headers["X-Parley-Timestamp"]
    if abs(time.time() - int(timestamp)) > tolerance:
        return False
    signed = timestamp.encode() + b"." + body
    expected = "v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, given.strip()) for given in headers["X-Parley-Signature"].split(","))


# --- signing and the happy path -------------------------------------------------------------


async def test_a_call_is_signed_and_verifies_with_the_documented_recipe(tenant, server):
    tool = await hook(tenant, "/ok", port=server.port)

    outcome = await call(tenant.pk)

    assert outcome.ok, outcome.error
    assert json.loads(outcome.content) == {"order": 42, "status": "shipped"}
    assert outcome.arguments == {"order_id": 42}
    [request] = server.requests
    assert json.loads(request["body"]) == {
        "tool": "order_status",
        "arguments": {"order_id": 42},
        "conversation_id": "6f1c1d7e-0000-4000-8000-000000000001",
        "end_user": "user-7",
        "call_id": "call_1",
    }
    headers = request["headers"]
    assert headers["Content-Type"] == "application/json"
    assert abs(int(headers["X-Parley-Timestamp"]) - time.time()) < 5
    assert tool.secret.startswith("whsec_")
    assert parley_call_verified(tool.secret, headers, request["body"])


async def test_a_tampered_body_an_old_timestamp_or_another_secret_fail_verification(tenant, server):
    tool = await hook(tenant, "/ok", port=server.port)
    await call(tenant.pk)
    [request] = server.requests
    headers, body = request["headers"], request["body"]

    assert not parley_call_verified(tool.secret, headers, body.replace(b"42", b"43"))
    assert not parley_call_verified("whsec_another", headers, body)
    replayed = {**headers, "X-Parley-Timestamp": str(int(headers["X-Parley-Timestamp"]) - 600)}
    assert not parley_call_verified(tool.secret, replayed, body)


def test_the_signing_secret_is_encrypted_at_rest_and_never_in_a_repr(tenant, server):
    from django.db import connection

    tool = make_hook(tenant, "/ok", port=server.port)
    with connection.cursor() as cursor:
        cursor.execute("SELECT secret FROM tools_webhooktool WHERE id = %s", [tool.pk])
        [stored] = cursor.fetchone()
    assert tool.secret not in stored
    assert WebhookTool.objects.get(pk=tool.pk).secret == tool.secret
    target = WebhookTarget(url=tool.url, secret=tool.secret, timeout_seconds=1)
    assert tool.secret not in repr(target) and tool.secret not in repr(tool)


# --- a failing webhook is a tool error ------------------------------------------------------


async def test_a_webhook_slower_than_its_timeout_is_a_tool_error(tenant, server):
    await hook(tenant, "/slow", port=server.port, timeout_seconds=1)

    started = time.monotonic()
    outcome = await call(tenant.pk)

    assert time.monotonic() - started < 1.8
    assert not outcome.ok
    assert "within 1 s" in outcome.error
    assert json.loads(outcome.content) == {"error": outcome.error}


@pytest.mark.parametrize(
    "path, complaint",
    [
        ("/fail", "answered HTTP 500"),
        ("/redirect", "answered HTTP 307"),
        ("/text", "answered with text/plain, not application/json"),
        ("/bad-json", "invalid JSON"),
        ("/big", f"larger than {MAX_RESPONSE_BYTES} bytes"),
    ],
)
async def test_unusable_replies_are_tool_errors(tenant, server, path, complaint):
    await hook(tenant, path, port=server.port)

    outcome = await call(tenant.pk)

    assert not outcome.ok
    assert complaint in outcome.error
    assert outcome.arguments == {"order_id": 42}


async def test_an_endless_reply_is_cut_off_at_the_size_cap(tenant, server):
    await hook(tenant, "/big-stream", port=server.port)

    outcome = await call(tenant.pk)

    assert not outcome.ok
    assert f"larger than {MAX_RESPONSE_BYTES} bytes" in outcome.error
    assert server.aborted.wait(5), "the client kept reading past the cap"


async def test_nothing_listening_is_a_tool_error(tenant):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    await hook(tenant, "/ok", port=free_port)

    outcome = await call(tenant.pk)

    assert not outcome.ok
    assert outcome.error == "could not connect to the webhook"


# --- the address guard ----------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_a_loopback_webhook_is_refused_when_private_addresses_are_not_allowed(settings, tenant, server, host):
    await hook(tenant, "/ok", host=host, port=server.port)
    settings.TOOLS_WEBHOOK_ALLOW_PRIVATE = False

    outcome = await call(tenant.pk)

    assert not outcome.ok
    assert "refused" in outcome.error and "loopback" in outcome.error
    assert server.requests == []


@pytest.fixture
def resolver(monkeypatch):
    """Make chosen hostnames resolve to chosen addresses, and record every TCP connect."""
    answers: dict[str, list[str]] = {}
    connects: list[tuple[str, int]] = []

    async def resolve(host: str, port: int):
        return [ipaddress.ip_address(address) for address in answers[host]]

    real_connect = httpcore2.AnyIOBackend.connect_tcp

    async def connect(self, host, port, *args, **kwargs):
        connects.append((host, port))
        return await real_connect(self, host, port, *args, **kwargs)

    monkeypatch.setattr(egress, "address_resolve", resolve)
    monkeypatch.setattr(httpcore2.AnyIOBackend, "connect_tcp", connect)
    return answers, connects


@pytest.mark.parametrize(
    "addresses",
    [["10.0.0.1"], ["93.184.216.34", "10.0.0.1"], ["fd12::1"], ["::ffff:192.168.1.1"], ["100.64.0.7"]],
)
async def test_the_guard_checks_the_resolved_address_not_the_hostname(settings, tenant, server, resolver, addresses):
    answers, connects = resolver
    answers["hooks.example.com"] = addresses
    await hook(tenant, "/ok", host="hooks.example.com", port=server.port)
    settings.TOOLS_WEBHOOK_ALLOW_PRIVATE = False

    outcome = await call(tenant.pk)

    assert not outcome.ok
    assert "the webhook URL is refused: hooks.example.com resolves to" in outcome.error
    assert connects == []  # refused before any connection was attempted


async def test_cloud_metadata_addresses_are_refused_even_when_private_ones_are_allowed(tenant, server, resolver):
    answers, connects = resolver
    answers["metadata.example.com"] = ["169.254.169.254"]
    await hook(tenant, "/ok", host="metadata.example.com", port=server.port)

    outcome = await call(tenant.pk)

    assert not outcome.ok
    assert "cloud metadata" in outcome.error
    assert connects == []


async def test_the_connection_goes_to_the_checked_address_with_the_original_host_header(tenant, server, resolver):
    answers, connects = resolver
    answers["hooks.example.test"] = ["127.0.0.1"]
    await hook(tenant, "/ok", host="hooks.example.test", port=server.port)

    outcome = await call(tenant.pk)

    assert outcome.ok, outcome.error
    assert connects == [("127.0.0.1", server.port)]
    assert server.requests[0]["headers"]["Host"] == f"hooks.example.test:{server.port}"


async def test_plain_http_is_refused_outside_debug_unless_allowed(settings, tenant, server):
    await hook(tenant, "/ok", port=server.port)
    settings.DEBUG = False
    settings.TOOLS_WEBHOOK_ALLOW_HTTP = False

    outcome = await call(tenant.pk)

    assert not outcome.ok
    assert outcome.error == "the webhook URL must use https"
    assert server.requests == []


@pytest.mark.parametrize(
    "address, allow_private, refused",
    [
        ("8.8.8.8", False, False),
        ("2606:4700:4700::1111", False, False),
        ("127.0.0.1", False, True),
        ("::1", False, True),
        ("10.1.2.3", False, True),
        ("172.16.0.1", False, True),
        ("192.168.0.1", False, True),
        ("169.254.10.1", False, True),
        ("fe80::1", False, True),
        ("0.0.0.0", False, True),
        ("224.0.0.251", False, True),
        ("240.0.0.1", False, True),
        ("::ffff:127.0.0.1", False, True),
        ("127.0.0.1", True, False),
        ("10.1.2.3", True, False),
        ("169.254.169.254", True, True),
        ("fd00:ec2::254", True, True),
    ],
)
def test_address_policy(address, allow_private, refused):
    reason = address_refusal(ipaddress.ip_address(address), allow_private=allow_private)
    assert (reason is not None) == refused


# --- https: pinned IP, certificate and SNI for the URL's hostname ---------------------------


def _certificates(directory: Path, hostname: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for `hostname` it signed: (ca, cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Parley test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    ca, cert, key = _certificates(tmp_path, "hooks.example.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the client trusts the throwaway CA
    running = HookServer(tls=context)
    yield running
    running.close()


async def test_https_verifies_the_certificate_of_the_urls_hostname_on_the_pinned_address(
    settings, tenant, tls_server, resolver
):
    answers, connects = resolver
    answers["hooks.example.test"] = ["127.0.0.1"]
    answers["other.example.test"] = ["127.0.0.1"]
    settings.TOOLS_WEBHOOK_ALLOW_HTTP = False
    create = database_sync_to_async(webhook_tool_create)
    await create(tenant=tenant, name="good", parameters=PARAMETERS,
                        url=f"https://hooks.example.test:{tls_server.port}/ok")
    await create(tenant=tenant, name="mismatch", parameters=PARAMETERS,
                        url=f"https://other.example.test:{tls_server.port}/ok")

    good = await call(tenant.pk, "good")
    mismatch = await call(tenant.pk, "mismatch")

    assert good.ok, good.error
    assert connects == [("127.0.0.1", tls_server.port), ("127.0.0.1", tls_server.port)]
    assert tls_server.requests[0]["headers"]["Host"] == f"hooks.example.test:{tls_server.port}"
    assert not mismatch.ok  # the certificate names hooks.example.test, not other.example.test
    assert len(tls_server.requests) == 1
