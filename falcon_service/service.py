"""The BentoML service, built from `Settings` by `build_service`: it loads the model in the background, owns
the engine (through its client), serves the OpenAI app and the native APIs, and puts the server's edge in
front of BentoML.

This is the only module that knows BentoML, the engine, the API layer and the server together. Importing it
does nothing: `service.py` at the repository's root (what `bentoml serve` and `bentoml build` load) builds
the service from the environment's settings, and tests build one from settings of their own.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import signal
import tempfile
import threading
from collections.abc import AsyncGenerator, Mapping
from http import HTTPStatus
from pathlib import Path
from typing import Any, ClassVar

import bentoml
import yaml
from bentoml.exceptions import BentoMLException, NotFound
from fastapi import FastAPI

from .api.errors import to_api_error
from .api.protocol import ChatRequest, GenerateRequest
from .api.routes import caller_tenant, create_app, served_paths, until_disconnect
from .api.serving import OpenAIServing
from .config import Settings
from .engine import EngineClient
from .metrics import ServiceMetrics
from .server import patches
from .server.gateway import Drain, GatewayRules

log = logging.getLogger("falcon_service")
EXIT_LOAD_FAILED = 3  # the server's exit status when the model could not be loaded
BENTOML_ROUTES = frozenset({"/", "/docs.json", "/schema.json", "/metrics"})  # UI, docs, scrape: open unless scope "all"


def settings_from_environment(environ: Mapping[str, str] | None = None) -> Settings:
    """This deployment's settings: the FALCON_* variables, and inside a built Bento its manifest.

    At `bentoml build`, FALCON_BAKE_MODEL decides whether the model goes into the Bento. Inside a built
    Bento, the manifest says whether it is there (`bake_model`); a Bento that carries its model serves it
    unless FALCON_MODEL says otherwise; one that does not loads FALCON_MODEL from the store at BENTOML_HOME
    (a volume that an init container fills).
    """
    env = os.environ if environ is None else environ
    settings = Settings.from_env(dict(env))
    manifest = Path(env.get("BENTO_PATH", "")) / "bento.yaml"
    if not (env.get("BENTO_PATH") and manifest.is_file()):
        return settings
    services = yaml.safe_load(manifest.read_text()).get("services") or [{}]
    models = services[0].get("models") or []
    update: dict[str, Any] = {"bake_model": bool(models)}
    if models and "FALCON_MODEL" not in env:
        update["model"] = models[0]["tag"]
    return settings.model_copy(update=update)


def build_service(settings: Settings) -> bentoml.Service:
    """The BentoML service for these settings.

    Building it also sets the server's edge into BentoML and uvicorn (`server/patches.py`: once a process,
    each patch checking first that the installed version is one it was written for, and failing with the
    versions named otherwise) with these settings' rules.
    """
    log.setLevel(settings.log_level)  # the package's loggers: model loading, aborted requests
    serving = OpenAIServing(settings.model_name, default_chat_stop=settings.default_chat_stop)
    openai_app = create_app(serving)
    parts: dict[str, Any] = {"__doc__": FalconService.__doc__, "settings": settings, "serving": serving,
                             "openai_app": openai_app, "drain": Drain()}
    if settings.bake_model:  # the model goes into (or is in) the Bento; else it is loaded from BENTOML_HOME's store
        parts["model_ref"] = bentoml.models.BentoModel(settings.model)
    inner = type(FalconService.__name__, (FalconService,), parts)
    service = bentoml.service(name="falcon-service", workers=1, resources={"gpu": 1},
                              traffic={"timeout": settings.timeout}, labels={"model": settings.model_name})(inner)
    service = bentoml.asgi_app(openai_app, path="/")(service)
    patches.install(gateway_rules(settings, service), inner.drain, settings.head_timeout)
    atexit.unregister(_exit_status_of_a_failed_load)  # once, however many services a process builds
    atexit.register(_exit_status_of_a_failed_load)
    return service


def gateway_rules(settings: Settings, service: bentoml.Service) -> GatewayRules:
    """The server's routes (BentoML's own, the native APIs, the OpenAI app's) and the front door's settings."""
    native = {api.route for api in service.apis.values()}
    openai = served_paths(service.inner.openai_app)
    return GatewayRules(
        api_key=settings.api_key, key_scope=settings.api_key_scope, max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout, routes=frozenset(BENTOML_ROUTES | native | openai),
        route_prefixes=("/static_content/", "/assets/"),
        open_paths=frozenset(BENTOML_ROUTES | {"/v1/openapi.json"}),
        native_apis=frozenset(native),
    )


def _load_failed_mark(server_pid: int) -> Path:
    """Where a worker tells `bentoml serve` (its parent, pid `server_pid`) that loading the model failed."""
    return Path(tempfile.gettempdir()) / f"falcon-service-{server_pid}.load-failed"


def _exit_status_of_a_failed_load() -> None:
    """In `bentoml serve`'s own process, which builds the service too: a worker that failed to load the model
    stopped the server; the server then exits with EXIT_LOAD_FAILED, not the 0 of a stop it was asked for."""
    mark = _load_failed_mark(os.getpid())
    if mark.exists():
        mark.unlink(missing_ok=True)
        os._exit(EXIT_LOAD_FAILED)


@functools.cache
def _metrics(model_name: str) -> ServiceMetrics:
    """A model's Prometheus metrics: the process holds one set of series, however many services it builds."""
    return ServiceMetrics(model_name)


def _bento_error(exc: BaseException) -> BentoMLException:
    """The OpenAI routes' error (status and message), for `bentoml.SyncHTTPClient` callers."""
    err = to_api_error(exc)
    try:
        status = HTTPStatus(err.status)
    except ValueError:  # not a standard status: a client error all the same
        status = HTTPStatus.BAD_REQUEST
    return BentoMLException(err.message, error_code=status)


class FalconService:
    """Falcon-7B-Instruct with continuous batching and an OpenAI-compatible API at `/v1`."""

    # set by build_service on the class it makes of this one
    settings: ClassVar[Settings]
    serving: ClassVar[OpenAIServing]
    openai_app: ClassVar[FastAPI]
    drain: ClassVar[Drain]
    model_ref: ClassVar[bentoml.Model]  # with settings.bake_model: the model in the Bento

    def __init__(self) -> None:
        self.load_error: BaseException | None = None
        self.engine: EngineClient | None = None
        self._dead: str | None = None  # why the engine is not alive, once it is not (logged once)
        self._in_server = self._drain_on_sigterm()
        # Load in the background: /livez answers at once, /readyz and /health turn 200 when ready.
        threading.Thread(target=self._load, name="falcon-model-loader", daemon=True).start()

    def _drain_on_sigterm(self) -> bool:
        """On SIGTERM, drain before the server (uvicorn, whose handler is in place by now) shuts down: go
        unready, answer new requests 503 with Retry-After, let those in flight finish (at most
        FALCON_DRAIN_TIMEOUT seconds, then end them with an error), then hand the signal on. Returns whether
        the service runs inside a server (a worker of `bentoml serve`)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False  # not inside a server (the service built directly, as tests do): nothing to drain
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGTERM shuts down without draining")
            return False
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(sig: int, frame) -> None:
            if self.drain.draining:  # the arbiter passes the signal on too
                return
            self.drain.begin()
            log.info("SIGTERM: draining %d request(s) in flight, for at most %d s", self.drain.in_flight,
                     self.settings.drain_seconds)
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit(previous, sig)))

        signal.signal(signal.SIGTERM, on_sigterm)
        return True

    async def _drain_then_exit(self, previous, sig: int) -> None:
        if not await self.drain.wait_idle(self.settings.drain_seconds):
            log.warning("drain time is up with %d request(s) in flight: ending them", self.drain.in_flight)
            if self.engine is not None:
                self.engine.shutdown()  # every stream ends with an error event, then [DONE]
            await self.drain.wait_idle(10)
        log.info("drained; shutting down")
        if callable(previous):
            previous(sig, None)

    def _load(self) -> None:
        try:
            model = self._stored_model()
            if model.info.labels.get("random_weights") == "true":
                log.warning("serving %s: RANDOM WEIGHTS, for trying the plumbing only; its text is noise",
                            model.tag)
            log.info("loading %s", model.tag)
            metrics = _metrics(self.settings.model_name)
            self.engine = EngineClient.start(model.path, self.settings.engine_options(), observer=metrics)
            metrics.set_kv_capacity(self.engine.max_batch_tokens)  # KV-cache utilization's denominator
            self.serving.attach(self.engine)
        except BaseException as exc:
            log.exception("loading the model failed")
            self.load_error = exc
            self.serving.fail(exc)  # (a service built directly, as tests do, reports it: 503s, and not alive)
            if self._in_server:
                self._stop_server(f"loading the model failed: {type(exc).__name__}: {exc}")

    @staticmethod
    def _stop_server(reason: str) -> None:
        """End the whole server with a non-zero exit status, saying why: a load that failed will fail again,
        and a process that stays up answering 503 holds its pod for the startup probe's 20 minutes, where an
        exit puts the reason in the pod's log and the pod in CrashLoopBackOff (or a supervisor restarts it)."""
        log.critical("%s; stopping the server", reason)
        server = os.getppid()  # `bentoml serve`: it stops its workers, respawns none, and exits
        _load_failed_mark(server).write_text(reason)
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGTERM)
        os._exit(EXIT_LOAD_FAILED)

    def _stored_model(self) -> bentoml.Model:
        """The model in the Bento, or else in the store at BENTOML_HOME."""
        if self.settings.bake_model:
            return self.model_ref  # the stored model (BentoModel resolves on an instance)
        try:
            return bentoml.models.get(self.settings.model)
        except NotFound:
            home = os.environ.get("BENTOML_HOME", "~/bentoml")
            raise NotFound(f"model {self.settings.model} is not in the store at BENTOML_HOME={home}: import it "
                           "there first (`python import_model.py`; the Kubernetes init container does), or build a "
                           "Bento that carries it (FALCON_BAKE_MODEL=true bentoml build)") from None

    def __is_ready__(self) -> bool:
        return self.serving.ready and not self.drain.draining

    def __is_alive__(self) -> bool:
        """False once loading failed, or once the engine stopped making progress (a hung kernel, a step loop
        stuck, steps failing in a row): the orchestrator's liveness probe then restarts the pod."""
        if self.load_error is not None:
            return False
        if self.engine is None:
            return True  # still loading (the startup probe waits on readiness)
        alive, why = self.engine.alive(self.settings.engine_stall_seconds)
        if not alive and self._dead != why:
            self._dead = why
            log.error("the engine is not alive: %s", why)
        return alive

    @bentoml.api(input_spec=GenerateRequest)
    async def generate(self, ctx: bentoml.Context, **params: Any) -> AsyncGenerator[str, None]:
        """Stream the completion of `prompt` as text chunks."""
        try:  # the API key was checked by the gateway (server/gateway.py), as for every route
            chunks = await self.serving.generate(GenerateRequest(**params), caller_tenant(ctx.request))
            first = await anext(chunks, None)
        except Exception as exc:
            raise _bento_error(exc) from exc
        if first is not None:
            yield first
            async for chunk in chunks:
                yield chunk

    @bentoml.api(input_spec=ChatRequest)
    async def chat(self, ctx: bentoml.Context, **params: Any) -> dict[str, Any]:
        """Answer a conversation; returns the reply, the finish reason and token usage."""
        try:  # a client that hangs up (or times out) aborts the generation, as on /v1
            reply = await until_disconnect(ctx.request,
                                           self.serving.chat_reply(ChatRequest(**params), caller_tenant(ctx.request)))
        except Exception as exc:
            raise _bento_error(exc) from exc
        return reply.model_dump(mode="json")
