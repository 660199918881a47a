"""Patches of third-party internals: the HTTP server's edges that BentoML does not expose as settings.

- The front door (`gateway.Gateway`) must see a request before BentoML's traffic-metrics
  middleware does: that one labels its series with the raw path, so every unknown path would add
  series to /metrics for good. BentoML puts user middleware inside its own, so the gateway is
  installed around that middleware (BentoML builds it by name at app creation).
- One trace span per request, not per message: BentoML wraps the app in OpenTelemetry's ASGI
  middleware, which also opens a span for every message a response sends, so a streamed completion
  made a span per token (a quarter of the event loop's work at 16 streams), whether or not tracing
  exports anything. The middleware can leave those out (`exclude_spans`); BentoML does not ask it to.
- A deadline for request heads: uvicorn (httptools or h11) waits for a request's headers without
  limit (its keep-alive timeout restarts with every byte), so a client sending headers a byte at a
  time holds a connection for ever. Each connection must complete a request head within `head_timeout`.

Each is a `Patch` that names the versions of the packages it was written for. Installing one checks the
installed versions first and refuses any other with an error that names both (an upgrade is checked
against the patch, then added to its versions), and applies it once per process; what it is set to (the
gateway's rules, the deadline) may change with each install. `tests/server/test_patches.py` runs the
head deadline on a real uvicorn with each of its parsers and the middleware on a streamed response; the
e2e tests run them all under `bentoml serve`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from importlib import metadata

from .gateway import Drain, Gateway, GatewayRules

UVICORN = {"uvicorn": ("0.54", "0.55")}  # the image's lock pins 0.54.0, the dev requirements 0.55.0


class UnsupportedVersion(RuntimeError):
    """An installed package is at a version that a patch of its internals was not written for."""


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class Patch:
    """A change to a third-party package's internals, and the versions of the packages it was written for."""

    name: str
    written_for: Mapping[str, tuple[str, ...]]
    apply: Callable[[], None]
    applied: bool = False

    def accepts(self, distribution: str, version: str) -> bool:
        """Whether the patch was written for this version: `0.55` stands for 0.55 and every 0.55.x, `1.4.40` for
        that release (and its post-releases)."""
        return any(version == v or version.startswith(v + ".") for v in self.written_for[distribution])

    def check(self) -> None:
        """Raise `UnsupportedVersion`, naming the versions, unless every package is at one written for."""
        for distribution, versions in self.written_for.items():
            found = installed_version(distribution)
            if found is None or not self.accepts(distribution, found):
                present = f"{distribution} {found} is installed" if found else f"{distribution} is not installed"
                raise UnsupportedVersion(
                    f"{self.name}: written for {distribution} {' or '.join(versions)}, but {present}. Install a "
                    f"version it was written for (requirements.txt pins one), or check the patch against this one "
                    f"and add it to its versions (falcon_service/server/patches.py).")

    def install(self) -> None:
        """Check the versions (every time), then apply the patch (the first time)."""
        self.check()
        if not self.applied:
            self.apply()
            self.applied = True


def _gate_traffic_metrics() -> None:
    from bentoml._internal.server.http import instruments

    metrics_middleware = instruments.RunnerTrafficMetricsMiddleware

    class GatedTrafficMetrics(metrics_middleware):  # type: ignore[misc, valid-type]
        front_door: tuple[GatewayRules, Drain] | None = None  # set by install_gateway

        def __init__(self, app, **options) -> None:
            super().__init__(app, **options)
            assert self.front_door is not None, "install_gateway sets the rules before BentoML builds its app"
            self._gateway = Gateway(partial(metrics_middleware.__call__, self), *self.front_door)

        async def __call__(self, scope, receive, send) -> None:
            await self._gateway(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = GatedTrafficMetrics


def _request_spans_only() -> None:
    from opentelemetry.instrumentation import asgi

    class RequestSpansOnly(asgi.OpenTelemetryMiddleware):  # type: ignore[misc, valid-type]
        def __init__(self, app, *args, **options) -> None:
            options.setdefault("exclude_spans", ["receive", "send"])
            super().__init__(app, *args, **options)

    asgi.OpenTelemetryMiddleware = RequestSpansOnly  # BentoML imports it from there when it builds the app


def _arm(protocol) -> None:
    _disarm(protocol)
    if protocol.falcon_head_timeout is None:
        return
    protocol._falcon_head_timer = protocol.loop.call_later(protocol.falcon_head_timeout, _expire, protocol)


def _disarm(protocol) -> None:
    timer = getattr(protocol, "_falcon_head_timer", None)
    if timer is not None:
        timer.cancel()
        protocol._falcon_head_timer = None


def _expire(protocol) -> None:
    protocol._falcon_head_timer = None
    if protocol.falcon_waiting_for_head() and not protocol.transport.is_closing():  # still no whole head: drop it
        protocol.transport.close()


def _hook_h11() -> None:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    made, handle, completed = H11Protocol.connection_made, H11Protocol.handle_events, H11Protocol.on_response_complete

    def waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def connection_made(self, transport) -> None:
        made(self, transport)
        _arm(self)

    def handle_events(self) -> None:
        handle(self)
        if self.conn.their_state is not h11.IDLE:  # a whole request head arrived
            _disarm(self)

    def on_response_complete(self) -> None:
        _arm(self)  # before: completing may go straight on to a pipelined request, which disarms it
        completed(self)

    H11Protocol.falcon_waiting_for_head = waiting_for_head
    H11Protocol.connection_made = connection_made
    H11Protocol.handle_events = handle_events
    H11Protocol.on_response_complete = on_response_complete


def _hook_httptools() -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    made, headers_done, completed = (HttpToolsProtocol.connection_made, HttpToolsProtocol.on_headers_complete,
                                     HttpToolsProtocol.on_response_complete)

    def waiting_for_head(self) -> bool:  # no request in progress
        return self.cycle is None or self.cycle.response_complete

    def connection_made(self, transport) -> None:
        made(self, transport)
        _arm(self)

    def on_headers_complete(self) -> None:
        _disarm(self)  # a whole request head arrived (pipelined ones too: their heads are in)
        headers_done(self)

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # the next request's head is already in: it starts now
        completed(self)
        if not pipelined and not self.transport.is_closing():
            _arm(self)

    HttpToolsProtocol.falcon_waiting_for_head = waiting_for_head
    HttpToolsProtocol.connection_made = connection_made
    HttpToolsProtocol.on_headers_complete = on_headers_complete
    HttpToolsProtocol.on_response_complete = on_response_complete


GATEWAY_FIRST = Patch("the gateway in front of BentoML's traffic metrics", {"bentoml": ("1.4.40",)},
                      _gate_traffic_metrics)
REQUEST_SPANS = Patch("one trace span per request", {"bentoml": ("1.4.40",),
                                                     "opentelemetry-instrumentation-asgi": ("0.66b1",)},
                      _request_spans_only)
# what these reach into is uvicorn's protocol classes; of h11 they use its public API (a connection's their_state)
HEAD_DEADLINE_H11 = Patch("the request-head deadline (uvicorn's h11 protocol)", UVICORN, _hook_h11)
HEAD_DEADLINE_HTTPTOOLS = Patch("the request-head deadline (uvicorn's httptools protocol)", UVICORN, _hook_httptools)


def patches() -> list[Patch]:
    """The patches this process needs: the httptools one only where httptools is installed (uvicorn takes it
    then, as requirements.txt has it; h11 otherwise)."""
    found = [GATEWAY_FIRST, REQUEST_SPANS, HEAD_DEADLINE_H11]
    return [*found, HEAD_DEADLINE_HTTPTOOLS] if installed_version("httptools") else found


def install(rules: GatewayRules, drain: Drain, head_timeout: float | None) -> None:
    """Every patch, set to these values: all versions are checked before any patch is applied."""
    for patch in patches():
        patch.check()
    install_gateway(rules, drain)
    request_spans_only()
    limit_request_heads(head_timeout)


def install_gateway(rules: GatewayRules, drain: Drain) -> None:
    """Put the gateway, with these rules, in front of BentoML's traffic-metrics middleware (the outermost one)."""
    from bentoml._internal.server.http import instruments

    GATEWAY_FIRST.install()
    instruments.RunnerTrafficMetricsMiddleware.front_door = (rules, drain)


def request_spans_only() -> None:
    """Make the OpenTelemetry ASGI middleware that BentoML installs trace each request in one span, without
    a child span for each message received or sent (each SSE chunk of a stream)."""
    REQUEST_SPANS.install()


def limit_request_heads(head_timeout: float | None) -> None:
    """Close a connection that has not sent a whole request head within `head_timeout` seconds of
    opening, or of its previous response: in both of uvicorn's HTTP implementations. None: no deadline
    from now on."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    HEAD_DEADLINE_H11.install()
    H11Protocol.falcon_head_timeout = head_timeout
    if HEAD_DEADLINE_HTTPTOOLS in patches():
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        HEAD_DEADLINE_HTTPTOOLS.install()
        HttpToolsProtocol.falcon_head_timeout = head_timeout
