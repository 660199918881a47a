"""In-process API fixtures: the FastAPI app around a real engine on the tiny model, driven by httpx."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from falcon_service.api.routes import create_app
from falcon_service.api.serving import OpenAIServing
from falcon_service.engine import EngineClient
from falcon_service.engine.engine import Engine
from falcon_service.engine.scheduler import BatchLimits

MODEL_NAME = "falcon-7b-instruct"
ROOMY = BatchLimits(max_batch_size=16, max_batch_tokens=16 * 2048, max_prefill_tokens=4096, max_queue_size=64)


@dataclass
class Api:
    app: FastAPI
    serving: OpenAIServing
    engine: Engine
    client: httpx.AsyncClient

    def attach(self) -> None:
        self.serving.attach(EngineClient(self.engine))


MakeApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_api(tiny_model, tiny_tokenizer) -> AsyncIterator[MakeApi]:
    """Build an app + engine + client; everything is closed and shut down after the test.

    The client's transport re-raises any exception that escapes the app, so a handled error must
    come back as a response.
    """
    built: list[Api] = []

    async def make(*, model=None, limits: BatchLimits = ROOMY, attach: bool = True) -> Api:
        serving = OpenAIServing(MODEL_NAME)
        app = create_app(serving)
        if hasattr(model, "runner_factory"):  # a ControlledModel (tests/conftest.py)
            engine = Engine(model.inner, tiny_tokenizer, limits, runner_factory=model.runner_factory, cuda_graphs=False)
        else:
            engine = Engine(model if model is not None else tiny_model, tiny_tokenizer, limits)
        transport = httpx.ASGITransport(app=app)
        api = Api(app, serving, engine, httpx.AsyncClient(transport=transport, base_url="http://test"))
        built.append(api)
        if attach:
            api.attach()
        return api

    yield make
    for api in built:
        await api.client.aclose()
        api.engine.shutdown()


@pytest.fixture
async def api(make_api: MakeApi) -> Api:
    """A ready app (engine attached, no API key)."""
    return await make_api()
