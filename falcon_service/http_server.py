"""The HTTP server's edges that BentoML does not expose as settings.

- The front door (`api.gateway.Gateway`) must see a request before BentoML's traffic-metrics
  middleware does: that one labels its series with the raw path, so every unknown path would add
  series to /metrics for good. BentoML puts user middleware inside its own, so the gateway is
  installed around that middleware (BentoML builds it by name at app creation).
- A deadline for request heads: uvicorn (h11) waits for a request's headers without limit (its
  keep-alive timeout restarts with every byte), so a client sending headers a byte at a time holds
  a connection for ever. Each connection must complete a request head within `head_timeout`.

Both adapt pinned versions (bentoml 1.4.40, uvicorn 0.54); the e2e tests exercise both.
"""

from __future__ import annotations

import logging
from functools import partial

from .api.gateway import Drain, Gateway, GatewayRules

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


def limit_request_heads(head_timeout: float) -> None:
    """Close a connection that has not sent a whole request head within `head_timeout` seconds of
    opening, or of its previous response."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if getattr(H11Protocol, "falcon_head_timeout", None) is not None:
        H11Protocol.falcon_head_timeout = head_timeout
        return
    H11Protocol.falcon_head_timeout = head_timeout
    made, handle, completed = H11Protocol.connection_made, H11Protocol.handle_events, H11Protocol.on_response_complete

    def arm(self) -> None:
        disarm(self)
        self._falcon_head_timer = self.loop.call_later(self.falcon_head_timeout, expire, self)

    def disarm(self) -> None:
        timer = getattr(self, "_falcon_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._falcon_head_timer = None

    def expire(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # still no whole head: drop it
            self.transport.close()

    def connection_made(self, transport) -> None:
        made(self, transport)
        arm(self)

    def handle_events(self) -> None:
        handle(self)
        if self.conn.their_state is not h11.IDLE:  # a whole request head arrived
            disarm(self)

    def on_response_complete(self) -> None:
        arm(self)  # before: completing may go straight on to a pipelined request, which disarms it
        completed(self)

    H11Protocol.connection_made = connection_made
    H11Protocol.handle_events = handle_events
    H11Protocol.on_response_complete = on_response_complete
