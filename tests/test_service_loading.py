"""The service starts without waiting for the model: __init__ returns at once, /health and
/readyz say 503 while the weights load, then 200; a failed load marks the service dead."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import asyncio, threading, time
    import transformers
    import httpx

    release = threading.Event()
    real = transformers.AutoModelForCausalLM.from_pretrained
    loads = []

    def slow_from_pretrained(*args, **kwargs):  # stands in for minutes of loading 14 GB of weights
        loads.append(args)
        assert release.wait(30)
        if FAIL:
            raise RuntimeError("weights are corrupt")
        return real(*args, **kwargs)

    transformers.AutoModelForCausalLM.from_pretrained = slow_from_pretrained
    if NO_MEMORY:  # a machine with 64 MiB free: the tiny model's weights alone would not fit with its KV cache
        import falcon_service.engine.kv_cache as kv_cache
        kv_cache.available_host_memory = lambda: 64 * 2**20
    from falcon_service import service

    async def health():
        transport = httpx.ASGITransport(app=service.openai_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.get("/health")).status_code

    started = time.monotonic()
    svc = service.FalconService.inner()
    print("init_seconds", round(time.monotonic() - started, 3))
    print("loading", svc.__is_ready__(), svc.__is_alive__(), asyncio.run(health()))
    release.set()
    for _ in range(600):
        if svc.__is_ready__() or not svc.__is_alive__():
            break
        time.sleep(0.05)
    print("after", svc.__is_ready__(), svc.__is_alive__(), asyncio.run(health()))
    print("weights_read", len(loads))
    async def health_body():
        transport = httpx.ASGITransport(app=service.openai_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return (await c.get("/health")).json()
    print("health", (asyncio.run(health_body()).get("error") or {}).get("message"))
    async def native_chat_error():
        from falcon_service.api.protocol import ChatRequest
        try:
            await service.serving.chat_reply(ChatRequest(messages=[{"role": "user", "content": "hi"}]))
        except Exception as exc:
            return service._bento_error(exc)
    err = asyncio.run(native_chat_error()) if not svc.__is_ready__() else None
    print("native", err.error_code.value if err else None, err)
    print("error", type(svc.load_error).__name__, str(svc.load_error))
    """
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    sys.path.insert(0, str(REPO))
    from import_model import import_random

    home = tmp_path_factory.mktemp("bentoml_home")
    return home, import_random("tiny", bentoml_home=home).name


def run(store: tuple[Path, str], fail: bool, no_memory: bool = False) -> dict[str, list[str]]:
    home, name = store
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALCON_")}
    env.update(BENTOML_HOME=str(home), FALCON_MODEL=name, PYTHONPATH=str(REPO))
    code = f"FAIL = {fail}\nNO_MEMORY = {no_memory}\n" + SCRIPT
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines() if line.strip()}


def test_model_loads_in_background_and_readiness_follows(store) -> None:
    lines = run(store, fail=False)
    assert float(lines["init_seconds"][0]) < 5, "__init__ waited for the model"
    assert lines["loading"] == ["False", "True", "503"]
    assert lines["after"] == ["True", "True", "200"]


def test_failed_load_marks_service_dead_and_says_so(store) -> None:
    lines = run(store, fail=True)
    assert lines["loading"] == ["False", "True", "503"]
    assert lines["after"] == ["False", "False", "503"]
    # /health and the native APIs say the load failed, and why (not "loading", not "unexpected error")
    health = " ".join(lines["health"])
    assert health.startswith("Loading the model failed") and "weights are corrupt" in health
    assert lines["native"][0] == "503" and "Loading the model failed" in " ".join(lines["native"][1:])


def test_a_model_that_does_not_fit_fails_at_once_saying_what_to_change(store) -> None:
    lines = run(store, fail=False, no_memory=True)
    assert lines["after"] == ["False", "False", "503"]
    assert lines["weights_read"] == ["0"], "the weights were read although they could not fit"
    name, message = lines["error"][0], " ".join(lines["error"][1:])
    assert name == "InsufficientMemoryError"
    assert "0.1 GiB is free" in message and "FALCON_MAX_BATCH_TOKENS" in message, message
