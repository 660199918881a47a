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

import hmac
import logging
import threading
from collections.abc import AsyncGenerator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import bentoml
import yaml
from bentoml.exceptions import BentoMLException
from pydantic import ValidationError

from .api.errors import to_api_error
from .api.protocol import ChatCompletionRequest, CompletionRequest
from .api.routes import create_app
from .api.serving import OpenAIServing
from .config import Settings

log = logging.getLogger("falcon_service")


def _settings() -> Settings:
    """Settings from the environment; inside a built Bento, FALCON_MODEL defaults to the model it was built with."""
    settings = Settings.from_env()
    manifest = Path(os.environ.get("BENTO_PATH", "")) / "bento.yaml"
    if "FALCON_MODEL" not in os.environ and os.environ.get("BENTO_PATH") and manifest.is_file():
        services = yaml.safe_load(manifest.read_text()).get("services") or [{}]
        models = services[0].get("models") or []
        if models:
            settings = settings.model_copy(update={"model": models[0]["tag"]})
    return settings


SETTINGS = _settings()
log.setLevel(SETTINGS.log_level)  # the package's loggers: model loading, aborted requests
serving = OpenAIServing(SETTINGS.model_name, default_chat_stop=SETTINGS.default_chat_stop)
openai_app = create_app(serving, SETTINGS.api_key)


def _authorize(ctx: bentoml.Context) -> None:
    """The native APIs take the same API key as /v1 (`bentoml.SyncHTTPClient(url, token=key)`)."""
    if not SETTINGS.api_key:
        return
    scheme, _, token = ctx.request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), SETTINGS.api_key.encode()):
        raise BentoMLException("Invalid or missing API key (send `Authorization: Bearer <key>`).",
                               error_code=HTTPStatus.UNAUTHORIZED)


def _bento_error(exc: BaseException) -> BentoMLException:
    """The same errors as the OpenAI routes, for `bentoml.SyncHTTPClient` callers."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or "request"
        return BentoMLException(f"Invalid value for `{param}`: {first['msg']}", error_code=HTTPStatus.BAD_REQUEST)
    err = to_api_error(exc)
    return BentoMLException(err.message, error_code=HTTPStatus(err.status))


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

    model_ref = bentoml.models.BentoModel(SETTINGS.model)

    def __init__(self) -> None:
        self.load_error: BaseException | None = None
        self.engine = None
        # Load in the background: /livez answers at once, /readyz and /health turn 200 when ready.
        threading.Thread(target=self._load, name="falcon-model-loader", daemon=True).start()

    def _load(self) -> None:
        try:
            import time
            from functools import partial

            import torch
            from transformers import AutoConfig

            from .engine.engine import Engine
            from .engine.falcon import FalconRunner, check_architecture
            from .engine.kv_cache import default_kv_budget
            from .engine.loader import (
                checkpoint_dtype,
                choose_dtype,
                cpu_has_fast_bf16,
                estimate_memory,
                load_model,
            )
            from .engine.scheduler import BatchLimits
            from .metrics import ServiceMetrics

            started = time.perf_counter()
            path = self.model_ref.path
            labels = self.model_ref.info.labels
            if labels.get("random_weights") == "true":
                log.warning("serving %s: RANDOM WEIGHTS, for trying the plumbing only; its text is noise",
                            self.model_ref.tag)
            config = AutoConfig.from_pretrained(path)
            check_architecture(config)
            device = SETTINGS.torch_device(torch.cuda.is_available())
            max_len = int(getattr(config, "max_position_embeddings", 2048) or 2048)
            # before reading any weight: will they and the smallest KV cache fit? (else fail now, saying why)
            kv_tokens = SETTINGS.max_batch_tokens or max_len
            float32_fits = estimate_memory(path, config, device, torch.float32, kv_tokens).fits
            dtype = choose_dtype(SETTINGS.dtype, device, checkpoint_dtype(path), cpu_has_fast_bf16(), float32_fits)
            estimate = estimate_memory(path, config, device, dtype, kv_tokens)
            log.info("model %s needs %s", self.model_ref.tag, estimate.describe())
            estimate.check()
            model, tokenizer = load_model(path, device, dtype)
            budget = SETTINGS.max_batch_tokens or default_kv_budget(
                model.config, model.dtype, model.device, SETTINGS.kv_cache_memory_fraction, SETTINGS.max_batch_size,
                max_len,
            )
            limits = BatchLimits(SETTINGS.max_batch_size, budget, SETTINGS.max_prefill_tokens, SETTINGS.max_queue_size)
            threads = SETTINGS.torch_threads or len(os.sched_getaffinity(0))
            self.engine = Engine(model, tokenizer, limits, observer=ServiceMetrics(SETTINGS.model_name),
                                 runner_factory=partial(FalconRunner, release_weights=True),
                                 threads=threads if device == "cpu" else None,
                                 cuda_graphs=SETTINGS.cuda_graphs and device == "cuda")
            if self.engine.graphs is not None:
                log.info("capturing decode graphs")
                self.engine.capture_graphs()
            serving.attach(self.engine)
            log.info("model %s ready on %s (%s) in %.1f s; KV budget %d tokens", self.model_ref.tag, device,
                     str(dtype).removeprefix("torch."), time.perf_counter() - started, budget)
        except BaseException as exc:  # reported by __is_alive__ so that the orchestrator restarts us
            log.exception("loading the model failed")
            self.load_error = exc

    def __is_ready__(self) -> bool:
        return serving.ready

    def __is_alive__(self) -> bool:
        return self.load_error is None

    @bentoml.api
    async def generate(
        self,
        prompt: str,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        ignore_eos: bool = False,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> AsyncGenerator[str, None]:
        """Stream the completion of `prompt` as text chunks."""
        _authorize(ctx)
        try:
            body = CompletionRequest(model=serving.model_name, prompt=prompt, max_tokens=max_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed,
                                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                     repetition_penalty=repetition_penalty, ignore_eos=ignore_eos)
            chunks = serving.text_stream(body)
            first = await anext(chunks, None)
        except Exception as exc:
            raise _bento_error(exc) from exc
        if first is not None:
            yield first
            async for chunk in chunks:
                yield chunk

    @bentoml.api
    async def chat(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        stop: list[str] | None = None,
        seed: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repetition_penalty: float = 1.0,
        ctx: bentoml.Context = None,  # type: ignore[assignment]
    ) -> dict[str, Any]:
        """Answer a conversation; returns the reply, the finish reason and token usage."""
        _authorize(ctx)
        try:
            body = ChatCompletionRequest(model=serving.model_name, messages=messages, max_tokens=max_tokens,
                                         temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed,
                                         presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                         repetition_penalty=repetition_penalty)
            response = await serving.chat(body)
        except Exception as exc:
            raise _bento_error(exc) from exc
        choice = response.choices[0]
        return {"reply": choice.message.content, "finish_reason": choice.finish_reason,
                "usage": response.usage.model_dump()}
