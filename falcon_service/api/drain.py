"""Graceful shutdown: once draining, new requests get a 503 with `Retry-After` while those in flight
finish; the caller (the service) shuts the server down when none is left or a time cap has passed.

A pure ASGI middleware, so that it sees every request of the server (the OpenAI routes, the native
APIs, BentoML's own), and a little shared state. Probes and metrics are always answered: Kubernetes
must see the pod go unready (it removes it from the Service's endpoints), and scrapes go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

PROBES = ("/livez", "/readyz", "/health", "/metrics")
RETRY_AFTER_SECONDS = 1


class Drain:
    """Counts the requests in flight; after `begin()`, turns new ones away."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._changed: asyncio.Event | None = None

    def begin(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (True), or `timeout` seconds (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._changed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
        return True

    def _done(self) -> None:
        self.in_flight -= 1
        if self._changed is not None:
            self._changed.set()


class DrainMiddleware:
    """The ASGI side of `Drain` (BentoML's `add_asgi_middleware(DrainMiddleware, drain=...)`)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path", "").startswith(PROBES):
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            await _shutting_down(send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain._done()


async def _shutting_down(send) -> None:
    body = json.dumps({"error": {"message": "This server is shutting down; retry, another replica will answer.",
                                 "type": "service_unavailable", "param": None, "code": "shutting_down"}}).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_SECONDS).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
