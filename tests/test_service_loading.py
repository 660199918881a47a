"""The service starts without waiting for the model: __init__ returns while the weights are still being read,
/health and /readyz say 503 until they are loaded, then 200; a failed load marks the service dead and says why.

The service is built in process from settings (`build_service`), as `bentoml serve` builds it; the test holds
the read of the weights until it lets it go. (How long __init__ takes is measured in
benchmarks/service_start.py, not asserted here.)
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import bentoml
import httpx
import pytest
import transformers

from falcon_service import service as service_module
from falcon_service.api.protocol import ChatRequest
from falcon_service.config import Settings
from falcon_service.service import build_service

REPO = Path(__file__).resolve().parents[1]
LOAD_BOUND_SECONDS = 60.0  # a bound on waiting for the tiny model, never a speed assertion


@dataclass
class HeldWeights:
    """Reads of the weights wait for `release`; with `failure` set they raise it instead of loading."""

    release: threading.Event = field(default_factory=threading.Event)
    reads: list[tuple] = field(default_factory=list)
    failure: BaseException | None = None


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    sys.path.insert(0, str(REPO))
    from import_model import import_random

    home = tmp_path_factory.mktemp("bentoml_home")
    return home, str(import_random("tiny", bentoml_home=home))


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch, store: tuple[Path, str]) -> HeldWeights:
    """The weights' read held (it stands in for minutes of reading 14 GB), and the store at the test's home."""
    from bentoml._internal.models.model import ModelStore

    home, _ = store
    weights = HeldWeights()
    real, real_get = transformers.AutoModelForCausalLM.from_pretrained, bentoml.models.get

    def held_from_pretrained(*args, **kwargs):
        weights.reads.append(args)
        assert weights.release.wait(30)
        if weights.failure is not None:
            raise weights.failure
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", held_from_pretrained)
    monkeypatch.setattr(bentoml.models, "get", lambda tag: real_get(tag, _model_store=ModelStore(home / "models")))
    yield weights
    weights.release.set()


@pytest.fixture
def start(store: tuple[Path, str], held: HeldWeights):
    """`start()`: the service built from settings for the stored tiny model, and an instance of it (its engine
    shut down after the test)."""
    started = []

    def make():
        service = build_service(Settings(model=store[1]))
        instance = service.inner()
        started.append(instance)
        return instance

    yield make
    held.release.set()
    for instance in started:
        wait_until_settled(instance)
        if instance.engine is not None:
            instance.engine.shutdown()


def wait_until_settled(instance) -> None:
    """Until the load has ended, one way or the other."""
    deadline = time.monotonic() + LOAD_BOUND_SECONDS
    while not (instance.__is_ready__() or instance.load_error is not None) and time.monotonic() < deadline:
        time.sleep(0.05)


async def health(instance) -> httpx.Response:
    transport = httpx.ASGITransport(app=instance.openai_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get("/health")


def state(instance) -> tuple[bool, bool, int]:
    """(ready, alive, /health's status)."""
    return instance.__is_ready__(), instance.__is_alive__(), asyncio.run(health(instance)).status_code


def test_model_loads_in_background_and_readiness_follows(start, held: HeldWeights) -> None:
    instance = start()  # returns while the weights' read is held: it did not wait for the model
    assert state(instance) == (False, True, 503)
    held.release.set()
    wait_until_settled(instance)
    assert state(instance) == (True, True, 200)
    assert len(held.reads) == 1


def test_failed_load_marks_service_dead_and_says_so(start, held: HeldWeights) -> None:
    held.failure = RuntimeError("weights are corrupt")
    instance = start()
    assert state(instance) == (False, True, 503)
    held.release.set()
    wait_until_settled(instance)
    assert state(instance) == (False, False, 503)
    # /health and the native APIs say the load failed, and why (not "loading", not "unexpected error")
    message = asyncio.run(health(instance)).json()["error"]["message"]
    assert message.startswith("Loading the model failed") and "weights are corrupt" in message

    async def native_chat() -> BaseException:
        try:
            await instance.serving.chat_reply(ChatRequest(messages=[{"role": "user", "content": "hi"}]))
        except Exception as exc:
            return service_module._bento_error(exc)
        raise AssertionError("the native chat answered without a model")

    error = asyncio.run(native_chat())
    assert error.error_code == 503 and "Loading the model failed" in str(error)


def test_a_model_that_does_not_fit_fails_at_once_saying_what_to_change(start, held, monkeypatch) -> None:
    from falcon_service.engine import kv_cache

    # a machine with 64 MiB free: the tiny model's weights alone would not fit with its KV cache
    monkeypatch.setattr(kv_cache, "available_host_memory", lambda: 64 * 2**20)
    instance = start()
    wait_until_settled(instance)  # the weights' read is still held: the check came before it
    assert state(instance) == (False, False, 503)
    assert held.reads == [], "the weights were read although they could not fit"
    assert type(instance.load_error).__name__ == "InsufficientMemoryError"
    message = str(instance.load_error)
    assert "0.1 GiB is free" in message and "FALCON_MAX_BATCH_TOKENS" in message, message
