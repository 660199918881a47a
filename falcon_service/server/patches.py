"""The HTTP server's edges that BentoML does not expose as settings.

- The front door (`gateway.Gateway`) must see a request before BentoML's traffic-metrics
  middleware does: that one labels its series with the raw path, so every unknown path would add
  series to /metrics for good. BentoML puts user middleware inside its own, so the gateway is
  installed around that middleware (BentoML builds it by name at app creation).
- A deadline for request heads: uvicorn (httptools or h11) waits for a request's headers without
  limit (its keep-alive timeout restarts with every byte), so a client sending headers a byte at a
  time holds a connection for ever. Each connection must complete a request head within `head_timeout`.
- One trace span per request, not per message: BentoML wraps the app in OpenTelemetry's ASGI
  middleware, which also opens a span for every message a response sends, so a streamed completion
  made a span per token (a quarter of the event loop's work at 16 streams), whether or not tracing
  exports anything. The middleware can leave those out (`exclude_spans`); BentoML does not ask it to.

They adapt pinned versions (bentoml 1.4.40, uvicorn 0.55, httptools 0.9, opentelemetry-instrumentation-asgi
0.66b1); the e2e tests exercise them (the head deadline with httptools, as the server runs), and
`tests/server/test_patches.py` runs the head deadline on a real uvicorn with each of its parsers and the
middleware on a streamed response.
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial

from .gateway import Drain, Gateway, GatewayRules

log = logging.getLogger(__name__)


def install_gateway(rules: GatewayRules, drain: Drain) -> None:
    """Put the gateway in front of BentoML's traffic-metrics middleware (the outermost one)."""
    from bentoml._internal.server.http import instruments

    metrics_middleware = instruments.RunnerTrafficMetricsMiddleware
    if getattr(metrics_middleware, "falcon_gateway", False):
        return

    class GatedTrafficMetrics(metrics_middleware):  # type: ignore[misc, valid-type]
        falcon_gateway = True

        def __init__(self, app, **options) -> None:
            super().__init__(app, **options)
            self._gateway = Gateway(partial(metrics_middleware.__call__, self), rules, drain)

        async def __call__(self, scope, receive, send) -> None:
            await self._gateway(scope, receive, send)

    instruments.RunnerTrafficMetricsMiddleware = GatedTrafficMetrics


def request_spans_only() -> None:
    """Make the OpenTelemetry ASGI middleware that BentoML installs trace each request in one span, without
    a child span for each message received or sent (each SSE chunk of a stream)."""
    from opentelemetry.instrumentation import asgi

    middleware = asgi.OpenTelemetryMiddleware
    if getattr(middleware, "falcon_request_spans_only", False):
        return

    class RequestSpansOnly(middleware):  # type: ignore[misc, valid-type]
        falcon_request_spans_only = True

        def __init__(self, app, *args, **options) -> None:
            options.setdefault("exclude_spans", ["receive", "send"])
            super().__init__(app, *args, **options)

    asgi.OpenTelemetryMiddleware = RequestSpansOnly  # BentoML imports it from there when it builds the app


def limit_request_heads(head_timeout: float | None) -> None:
    """Close a connection that has not sent a whole request head within `head_timeout` seconds of
    opening, or of its previous response: in both of uvicorn's HTTP implementations (it takes
    httptools when installed, as requirements.txt pins it; h11 otherwise). None: no deadline from now on."""
    _limit_h11(head_timeout)
    with contextlib.suppress(ImportError):
        _limit_httptools(head_timeout)


def _set_deadline(protocol_class, head_timeout: float | None) -> bool:
    """Set a protocol class's deadline; whether its hooks are still to be installed (they are once)."""
    installed = "falcon_waiting_for_head" in protocol_class.__dict__
    protocol_class.falcon_head_timeout = head_timeout
    return not installed


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


def _limit_h11(head_timeout: float | None) -> None:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if not _set_deadline(H11Protocol, head_timeout):
        return
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


def _limit_httptools(head_timeout: float | None) -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    if not _set_deadline(HttpToolsProtocol, head_timeout):
        return
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
