"""The HTTP stack under `bentoml serve`.

BentoML builds its uvicorn config with neither `loop` nor `http` set ("auto"), so uvicorn takes
uvloop and httptools when they are installed. requirements.txt pins both: a libuv event loop and a
C HTTP parser cost less CPU per streamed token than asyncio's own loop and h11 (benchmarks/RESULTS.md),
and on a CPU that time is taken from the engine. The request-head deadline (`server/patches.py`) must hold
with either parser: each runs here on a real uvicorn. And a streamed response is traced in one span,
not in one per SSE chunk (OpenTelemetry's ASGI middleware, as BentoML installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
import uvloop
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from falcon_service.server import patches
from falcon_service.server.patches import limit_request_heads

HEAD_TIMEOUT = 0.6
REPO = Path(__file__).resolve().parents[2]


async def _app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":  # a response that takes longer than the head deadline
        await asyncio.sleep(1.5 * HEAD_TIMEOUT)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def test_uvicorn_as_bentoml_configures_it_parses_http_with_httptools_on_a_uvloop_loop() -> None:
    config = uvicorn.Config(app=_app, log_config=None, workers=1, server_header=False)  # BentoML's options
    config.load()
    assert config.http_protocol_class.__module__ == "uvicorn.protocols.http.httptools_impl"
    loop = config.get_loop_factory()()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


@contextlib.contextmanager
def _serving(http: str, head_timeout: float | None):
    """A uvicorn server of `_app` on a free port with that request-head deadline; the deadline before it is
    put back afterwards (None when there was none), so that no later test inherits this one."""
    saved = {cls: getattr(cls, "falcon_head_timeout", None) for cls in (H11Protocol, HttpToolsProtocol)}
    limit_request_heads(head_timeout)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app=_app, host="127.0.0.1", port=port, http=http, log_config=None,
                            timeout_keep_alive=30)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.started
        yield port
    finally:
        srv.should_exit = True
        thread.join(10)
        for cls, value in saved.items():
            cls.falcon_head_timeout = value


@pytest.fixture(params=["httptools", "h11"])
def server(request):
    with _serving(request.param, HEAD_TIMEOUT) as port:
        yield port


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
SLOW = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"


def test_a_head_sent_a_line_at_a_time_is_cut_off(server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for _ in range(8):  # a line every quarter deadline: each would restart a keep-alive timer
            time.sleep(HEAD_TIMEOUT / 4)
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
        assert _closed_within(sock, 2 * HEAD_TIMEOUT)
        assert time.monotonic() - started < 4 * HEAD_TIMEOUT


def test_a_kept_alive_connection_serves_requests_and_is_closed_only_when_idle_past_the_deadline(server) -> None:
    with _connect(server) as sock:
        for _ in range(3):  # each response re-arms the deadline; each whole head disarms it
            time.sleep(HEAD_TIMEOUT / 2)
            sock.sendall(REQUEST)
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        # pipelined: the second head is in before the first response ends, and the deadline stays off
        # while the second one takes longer than it
        sock.sendall(SLOW + SLOW + REQUEST)
        replies = b""
        while replies.count(b"HTTP/1.1 200") < 3:
            chunk = sock.recv(1024)
            assert chunk, f"closed after {replies.count(b'HTTP/1.1 200')} of 3 pipelined responses"
            replies += chunk
        assert _closed_within(sock, 3 * HEAD_TIMEOUT)


@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_a_deadline_turned_off_leaves_an_idle_connection_open(http) -> None:
    """Turning the deadline off (as this file's fixture does after each test, when none was set before)
    stops it: it is not left at the last value for every server the process starts later."""
    with _serving(http, HEAD_TIMEOUT):
        pass  # hooks installed, deadline set
    with _serving(http, None) as port, _connect(port) as sock:
        assert not _closed_within(sock, 2 * HEAD_TIMEOUT)
        sock.sendall(REQUEST)
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        assert not _closed_within(sock, 2 * HEAD_TIMEOUT)


async def _stream(scope, receive, send) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    for i in range(5):
        await send({"type": "http.response.body", "body": b"data: %d\n\n" % i, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def test_a_streamed_response_is_traced_in_one_span_not_one_per_message() -> None:
    import inspect

    from _bentoml_impl.server.app import ServiceAppFactory
    from opentelemetry.instrumentation import asgi
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.util.http import ExcludeList

    from falcon_service.server.patches import request_spans_only

    # BentoML takes the middleware from its module when it builds a service's app
    assert "from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware" in inspect.getsource(
        ServiceAppFactory.middlewares.fget)
    request_spans_only()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = asgi.OpenTelemetryMiddleware(_stream, excluded_urls=ExcludeList([]), default_span_details=None,
                                       server_request_hook=None, client_request_hook=None, tracer_provider=provider)
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/v1/stream", "raw_path": b"/v1/stream", "query_string": b"",
             "headers": [], "scheme": "http", "server": ("127.0.0.1", 3000), "client": ("127.0.0.1", 5000),
             "http_version": "1.1", "root_path": ""}
    asyncio.run(app(scope, receive, send))
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 6
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == ["GET /v1/stream"], [s.name for s in spans]


# ---------- the versions each patch was written for ----------


def test_a_patch_is_applied_once_and_refuses_a_version_it_was_not_written_for(monkeypatch) -> None:
    applied = []
    patch = patches.Patch("a test patch", {"uvicorn": ("0.54", "0.55")}, lambda: applied.append(True))
    patch.install()
    patch.install()
    assert applied == [True]
    monkeypatch.setattr(patches, "installed_version", lambda distribution: "0.56.0")
    with pytest.raises(patches.UnsupportedVersion) as refused:
        patch.install()
    assert str(refused.value).startswith(
        "a test patch: written for uvicorn 0.54 or 0.55, but uvicorn 0.56.0 is installed.")
    monkeypatch.setattr(patches, "installed_version", lambda distribution: None)
    with pytest.raises(patches.UnsupportedVersion, match="uvicorn is not installed"):
        patch.install()


def test_the_service_does_not_start_on_a_version_its_patches_were_not_written_for(monkeypatch) -> None:
    from falcon_service.config import Settings
    from falcon_service.service import build_service

    real = patches.installed_version
    monkeypatch.setattr(patches, "installed_version",
                        lambda distribution: "1.5.0" if distribution == "bentoml" else real(distribution))
    with pytest.raises(patches.UnsupportedVersion, match=re.escape("bentoml 1.4.40, but bentoml 1.5.0 is")):
        build_service(Settings())


def test_the_patches_were_written_for_the_versions_installed_here_and_in_the_image() -> None:
    """The venv's (requirements.txt) and the image's lock (requirements-image.txt, which pins uvicorn 0.54)."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements-image.txt").read_text(), re.M))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    for patch in patches.patches():
        patch.check()
        for distribution in patch.written_for:
            assert patch.accepts(distribution, pins[distribution]), (patch.name, distribution, pins[distribution])


@pytest.mark.parametrize("protocol", [H11Protocol, HttpToolsProtocol])
def test_the_head_deadline_hooks_a_protocol_once_and_takes_each_new_deadline(protocol) -> None:
    saved = getattr(protocol, "falcon_head_timeout", None)
    try:
        limit_request_heads(1.0)
        hooked = protocol.connection_made
        limit_request_heads(2.0)
        assert protocol.connection_made is hooked and protocol.falcon_head_timeout == 2.0
    finally:
        protocol.falcon_head_timeout = saved
