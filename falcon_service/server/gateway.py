"""What every request meets before any route, parser or metric: the server's front door.

In order: probes always pass; the API key (before anything else is looked at: no key and a bad
body is a 401, not a 400); unknown paths are a 404 here (so that no per-path metric series is made
for them); a draining server turns new requests away (503 with Retry-After); a body over the size
limit is a 413 before it is read, and one that stalls between chunks a 408; the native APIs take
JSON only, and their errors are rewritten into OpenAI's error object. The body is read here, whole,
before any route sees it. A pure ASGI middleware: it knows nothing of BentoML (the service puts it
in front of BentoML's own middleware).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..api.errors import RETRY_AFTER_SECONDS, APIError, validation_error
from ..api.routes import TENANT
from .auth import check_api_key

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROBES = frozenset({"/livez", "/readyz", "/healthz", "/health"})


@dataclass(frozen=True)
class GatewayRules:
    """The front door's settings (from FALCON_* settings) and the server's routes."""

    api_key: str | None = None
    key_scope: Literal["api", "all"] = "api"  # "all": docs and metrics need the key too (probes never)
    max_body_bytes: int = 4 * 2**20
    body_timeout: float = 30.0  # seconds a request body may stall between two chunks
    routes: frozenset[str] = frozenset()  # exact paths the server serves
    route_prefixes: tuple[str, ...] = ()  # and paths under these (static assets)
    open_paths: frozenset[str] = frozenset()  # docs and metrics: without the key when key_scope is "api"
    native_apis: frozenset[str] = frozenset()  # BentoML's own APIs: JSON in, their errors rewritten
    # paths users try for the docs (FastAPI's and vLLM's names), answered with a redirect to ours; under the
    # key's rules of the docs
    aliases: tuple[tuple[str, str], ...] = (("/docs", "/"), ("/redoc", "/"), ("/openapi.json", "/docs.json"))

    def known(self, path: str) -> bool:
        return path in self.routes or path.startswith(self.route_prefixes) or self.alias(path) is not None

    def alias(self, path: str) -> str | None:
        return next((target for alias, target in self.aliases if alias == path), None)

    def open(self, path: str) -> bool:
        """Served without the key (probes always; docs, their assets and metrics with key_scope "api")."""
        return path in PROBES or (self.key_scope == "api" and (path in self.open_paths or self.alias(path) is not None
                                                               or path.startswith(self.route_prefixes)))


@dataclass
class Drain:
    """Counts the requests in flight; after `begin()` new ones are turned away (graceful shutdown)."""

    draining: bool = False
    in_flight: int = 0
    _changed: asyncio.Event | None = field(default=None, repr=False)

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


class _TooLarge(Exception):
    pass


class _Stalled(Exception):
    pass


class Gateway:
    """The front door as ASGI middleware around the whole server."""

    def __init__(self, app: ASGIApp, rules: GatewayRules, drain: Drain | None = None) -> None:
        self.app, self.rules = app, rules
        self.drain = drain or Drain()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self.app(scope, receive, send)
            return
        path, headers = scope["path"], _headers(scope)
        refusal = self._refusal(scope, path, headers)
        if refusal is not None:
            await _send_error(send, refusal)
            return
        if (target := self.rules.alias(path)) is not None:
            await send({"type": "http.response.start", "status": 307,
                        "headers": [(b"location", target.encode()), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        self.drain.in_flight += 1
        try:
            await self._serve(scope, receive, send, path in self.rules.native_apis)
        finally:
            self.drain._done()

    def _refusal(self, scope: Scope, path: str, headers: dict[str, str]) -> APIError | None:
        rules = self.rules
        if rules.api_key and not rules.open(path):
            try:
                tenant = check_api_key(headers.get("authorization"), rules.api_key)
            except APIError as exc:
                return exc
            if tenant is not None:  # several keys: the routes salt the caller's cached prefixes with its tenant
                scope.setdefault("state", {})[TENANT] = tenant
        if not rules.known(path):
            return APIError(404, f"Unknown endpoint {path}.", code="unknown_url")
        if self.drain.draining:
            return APIError(503, "This server is shutting down; retry, another replica will answer.",
                            type="service_unavailable", code="shutting_down",
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > rules.max_body_bytes):
            return _too_large(rules.max_body_bytes)
        if path in rules.native_apis and headers.get("content-type", "application/json").split(";")[0].strip() \
                not in ("application/json", ""):
            return APIError(415, "This API takes a JSON body (Content-Type: application/json).",
                            code="unsupported_media_type")
        return None

    async def _serve(self, scope: Scope, receive: Receive, send: Send, native: bool) -> None:
        try:
            body = await self._read_body(receive)
        except (_TooLarge, _Stalled) as exc:
            error = _too_large(self.rules.max_body_bytes) if isinstance(exc, _TooLarge) else APIError(
                408, f"The request body stalled for {self.rules.body_timeout:.0f} s.", code="request_timeout",
                headers={"Connection": "close"})
            await _send_error(send, error)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:  # the whole body at once; then what follows (a disconnect) comes as it comes
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        outgoing: Send = send
        if native:
            outgoing = _NativeErrorRewriter(send).send
        elif scope["path"] == "/docs.json":
            outgoing = _DocsScrubber(send).send
        await self.app(scope, replay, outgoing)

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole request body (at most the size limit; no piece later than the timeout), read before any
        route sees it: a parser is never handed a body too large or one that never ends."""
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.rules.body_timeout)
            except TimeoutError:
                raise _Stalled from None
            if message["type"] != "http.request":  # the client went away
                raise _Stalled
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.rules.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _NativeErrorRewriter:
    """BentoML answers its own APIs' errors as `{"error": str, "detail": [...]}` or a list of those;
    this rewrites an error response into OpenAI's error object, with the same status."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._start: Message | None = None
        self._body = b""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self._start = message  # held until the body is complete
            return
        if self._start is None:
            await self._send(message)
            return
        self._body += message.get("body", b"")
        if message.get("more_body"):
            return
        await _send_error(self._send, _native_error(self._start["status"], self._body))


class _DocsScrubber:
    """BentoML's OpenAPI document names its own version (a badge in the description) and contact: a
    server does not advertise what it runs on. This replaces both."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._start: Message | None = None
        self._body = b""

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._start = message
            return
        self._body += message.get("body", b"")
        if message.get("more_body") or self._start is None:
            return
        body = self._body
        with contextlib.suppress(ValueError, AttributeError):
            spec = json.loads(body)
            spec["info"] = {"title": spec["info"].get("title", "falcon-service"), "version": "1",
                            "description": "Falcon-7B-Instruct: an OpenAI-compatible API at /v1 and native APIs."}
            spec["tags"] = [{"name": tag["name"]} for tag in spec.get("tags", [])]
            body = json.dumps(spec).encode()
        headers = [(k, v) for k, v in self._start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await self._send({**self._start, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


def _native_error(status: int, body: bytes) -> APIError:
    try:
        data = json.loads(body or b"null")
    except ValueError:
        data = None
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, dict) and isinstance(data.get("error"), dict):  # already OpenAI's shape
        err = data["error"]
        return APIError(status, str(err.get("message")), err.get("type") or "invalid_request_error",
                        err.get("param"), err.get("code"))
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, list) and detail and isinstance(detail[0], dict) and "loc" in detail[0]:
        mapped = validation_error([{**d, "loc": tuple(d.get("loc", ()))} for d in detail])
        return APIError(status if status != 422 else 400, mapped.message, param=mapped.param)
    message = data.get("error") if isinstance(data, dict) else None
    kind = "invalid_request_error" if status < 500 else "server_error"
    return APIError(status, str(message or "The request failed."), type=kind)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than this server takes ({limit} bytes).",
                    code="request_too_large", headers={"Connection": "close"})


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


async def _send_error(send: Send, error: APIError) -> None:
    body = error.body().model_dump_json().encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (error.headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
