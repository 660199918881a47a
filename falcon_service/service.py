"""The BentoML service: loads the model, owns the engine, serves the OpenAI app and native APIs.

This is the only module that knows BentoML, the engine and the API layer together.
"""

from __future__ import annotations

import os

# Only the engine's step-loop thread runs multi-threaded torch work (it sets its own count, see
# Settings.torch_threads). OpenMP thread teams belong to the thread that starts them, and on CPU a
# team started first by any other thread makes the engine's ops about 2x slower. So every other
# thread stays single-threaded: this must run before torch is imported. (BentoML itself sets
# OMP_NUM_THREADS=1 in the worker of a GPU service, so its value says nothing about the machine.)
os.environ["OMP_NUM_THREADS"] = "1"

import asyncio
import atexit
import contextlib
import logging
import signal
import tempfile
import threading
from collections.abc import AsyncGenerator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import bentoml
import yaml
from bentoml.exceptions import BentoMLException, NotFound

from .api.errors import to_api_error
from .api.protocol import ChatRequest, GenerateRequest
from .api.routes import caller_tenant, create_app, served_paths, until_disconnect
from .api.serving import OpenAIServing
from .config import Settings
from .server.gateway import Drain, GatewayRules
from .server.patches import install_gateway, limit_request_heads, request_spans_only

log = logging.getLogger("falcon_service")
EXIT_LOAD_FAILED = 3  # the server's exit status when the model could not be loaded


def _load_failed_mark(server_pid: int) -> Path:
    """Where a worker tells `bentoml serve` (its parent, pid `server_pid`) that loading the model failed."""
    return Path(tempfile.gettempdir()) / f"falcon-service-{server_pid}.load-failed"


@atexit.register
def _exit_status_of_a_failed_load() -> None:
    """In `bentoml serve`'s own process, which imports this module too: a worker that failed to load the model
    stopped the server; the server then exits with EXIT_LOAD_FAILED, not the 0 of a stop it was asked for."""
    mark = _load_failed_mark(os.getpid())
    if mark.exists():
        mark.unlink(missing_ok=True)
        os._exit(EXIT_LOAD_FAILED)


def _settings() -> tuple[Settings, bool]:
    """Settings from the environment, and whether the model is part of the Bento (and so of its image).

    At `bentoml build`, FALCON_BAKE_MODEL decides. Inside a built Bento, its manifest says; a Bento
    that carries its model serves it unless FALCON_MODEL says otherwise; one that does not loads
    FALCON_MODEL from the store at BENTOML_HOME (a volume that an init container fills).
    """
    settings = Settings.from_env()
    manifest = Path(os.environ.get("BENTO_PATH", "")) / "bento.yaml"
    if not (os.environ.get("BENTO_PATH") and manifest.is_file()):
        return settings, settings.bake_model
    services = yaml.safe_load(manifest.read_text()).get("services") or [{}]
    models = services[0].get("models") or []
    if models and "FALCON_MODEL" not in os.environ:
        settings = settings.model_copy(update={"model": models[0]["tag"]})
    return settings, bool(models)


SETTINGS, MODEL_IN_BENTO = _settings()
log.setLevel(SETTINGS.log_level)  # the package's loggers: model loading, aborted requests
serving = OpenAIServing(SETTINGS.model_name, default_chat_stop=SETTINGS.default_chat_stop)
openai_app = create_app(serving)
drain = Drain()


def _bento_error(exc: BaseException) -> BentoMLException:
    """The OpenAI routes' error (status and message), for `bentoml.SyncHTTPClient` callers."""
    err = to_api_error(exc)
    try:
        status = HTTPStatus(err.status)
    except ValueError:  # not a standard status: a client error all the same
        status = HTTPStatus.BAD_REQUEST
    return BentoMLException(err.message, error_code=status)


@bentoml.asgi_app(openai_app, path="/")
@bentoml.service(
    name="falcon-service",
    workers=1,
    resources={"gpu": 1},
    traffic={"timeout": SETTINGS.timeout},
    labels={"model": SETTINGS.model_name},
)
class FalconService:
    """Falcon-7B-Instruct with continuous batching and an OpenAI-compatible API at `/v1`."""

    if MODEL_IN_BENTO:  # else loaded from the store at BENTOML_HOME when the service starts
        model_ref = bentoml.models.BentoModel(SETTINGS.model)

    def __init__(self) -> None:
        self.load_error: BaseException | None = None
        self.engine = None
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
            if drain.draining:  # the arbiter passes the signal on too
                return
            drain.begin()
            log.info("SIGTERM: draining %d request(s) in flight, for at most %d s", drain.in_flight,
                     SETTINGS.drain_seconds)
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit(previous, sig)))

        signal.signal(signal.SIGTERM, on_sigterm)
        return True

    async def _drain_then_exit(self, previous, sig: int) -> None:
        if not await drain.wait_idle(SETTINGS.drain_seconds):
            log.warning("drain time is up with %d request(s) in flight: ending them", drain.in_flight)
            if self.engine is not None:
                self.engine.shutdown()  # every stream ends with an error event, then [DONE]
            await drain.wait_idle(10)
        log.info("drained; shutting down")
        if callable(previous):
            previous(sig, None)

    def _load(self) -> None:
        try:
            from .engine import EngineClient
            from .metrics import ServiceMetrics

            model = self._stored_model()
            if model.info.labels.get("random_weights") == "true":
                log.warning("serving %s: RANDOM WEIGHTS, for trying the plumbing only; its text is noise",
                            model.tag)
            log.info("loading %s", model.tag)
            metrics = ServiceMetrics(SETTINGS.model_name)
            self.engine = EngineClient.start(model.path, SETTINGS.engine_options(), observer=metrics)
            metrics.set_kv_capacity(self.engine.max_batch_tokens)  # KV-cache utilization's denominator
            serving.attach(self.engine)
        except BaseException as exc:
            log.exception("loading the model failed")
            self.load_error = exc
            serving.fail(exc)  # (a service built directly, as tests do, reports it: 503s, and not alive)
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
        if MODEL_IN_BENTO:
            return self.model_ref  # the stored model (BentoModel resolves on an instance)
        try:
            return bentoml.models.get(SETTINGS.model)
        except NotFound:
            home = os.environ.get("BENTOML_HOME", "~/bentoml")
            raise NotFound(f"model {SETTINGS.model} is not in the store at BENTOML_HOME={home}: import it there "
                           "first (`python import_model.py`; the Kubernetes init container does), or build a Bento "
                           "that carries it (FALCON_BAKE_MODEL=true bentoml build)") from None

    def __is_ready__(self) -> bool:
        return serving.ready and not drain.draining

    def __is_alive__(self) -> bool:
        """False once loading failed, or once the engine stopped making progress (a hung kernel, a step loop
        stuck, steps failing in a row): the orchestrator's liveness probe then restarts the pod."""
        if self.load_error is not None:
            return False
        if self.engine is None:
            return True  # still loading (the startup probe waits on readiness)
        alive, why = self.engine.alive(SETTINGS.engine_stall_seconds)
        if not alive and self._dead != why:
            self._dead = why
            log.error("the engine is not alive: %s", why)
        return alive

    @bentoml.api(input_spec=GenerateRequest)
    async def generate(self, ctx: bentoml.Context, **params: Any) -> AsyncGenerator[str, None]:
        """Stream the completion of `prompt` as text chunks."""
        try:  # the API key was checked by the gateway (server/gateway.py), as for every route
            chunks = await serving.generate(GenerateRequest(**params), caller_tenant(ctx.request))
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
                                           serving.chat_reply(ChatRequest(**params), caller_tenant(ctx.request)))
        except Exception as exc:
            raise _bento_error(exc) from exc
        return reply.model_dump(mode="json")


def _gateway_rules() -> GatewayRules:
    """The server's routes (BentoML's own, the native APIs, the OpenAI app's) and the front door's settings."""
    bentoml_routes = {"/", "/docs.json", "/schema.json", "/metrics"}  # UI, docs, scrape: open unless scope "all"
    native = {api.route for api in FalconService.apis.values()}
    openai = served_paths(openai_app)
    return GatewayRules(
        api_key=SETTINGS.api_key, key_scope=SETTINGS.api_key_scope, max_body_bytes=SETTINGS.max_body_bytes,
        body_timeout=SETTINGS.body_timeout, routes=frozenset(bentoml_routes | native | openai),
        route_prefixes=("/static_content/", "/assets/"),
        open_paths=frozenset(bentoml_routes | {"/v1/openapi.json"}),
        native_apis=frozenset(native),
    )


install_gateway(_gateway_rules(), drain)
limit_request_heads(SETTINGS.head_timeout)
request_spans_only()
