"""Liveness against a real `bentoml serve`: a broken engine (steps failing in a row, a forward pass that never
returns) turns /livez to 503, so that Kubernetes restarts the pod; a model that cannot be loaded ends the
server with a non-zero status and the reason in its log."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def chat(url: str, model: str, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})


def livez(url: str) -> int:
    return httpx.get(f"{url}/livez", timeout=10).status_code


def wait_for(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


@pytest.mark.parametrize("engine_process", ["false", "true"], ids=["engine-in-server", "engine-process"])
def test_steps_failing_in_a_row_or_a_hung_step_fail_liveness(make_server, tmp_path, engine_process):
    """The faults go into the engine's forward pass, in the server's process or in the engine's own
    (FALCON_ENGINE_PROCESS: there through fault_site/sitecustomize.py, whose folder is on its PYTHONPATH)."""
    fault = tmp_path / "fault"
    env = {"FALCON_TEST_FAULT_FILE": str(fault), "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO / "tests" / "e2e" / "fault_site"), os.environ.get("PYTHONPATH")) if p)}
    served = make_server(f"faulty-{engine_process}", target="tests.e2e.faulty_service:FalconService",
                         env_extra=env, engine_stall_seconds="3", engine_process=engine_process)
    assert livez(served.url) == 200 and chat(served.url, served.model).status_code == 200
    # a broken device: every step fails; each request gets a 500, and after three in a row the pod is dead
    fault.write_text("fail")
    for _ in range(2):
        assert chat(served.url, served.model).status_code == 500
        assert livez(served.url) == 200, "one or two failed steps are not a dead engine"
    assert chat(served.url, served.model).status_code == 500
    assert livez(served.url) != 200
    fault.unlink()  # the device recovers (in this test): a good step makes the engine alive again
    assert chat(served.url, served.model).status_code == 200 and livez(served.url) == 200
    # a hung kernel: a request in flight, no step finishes; after the stall time the pod is dead
    fault.write_text("hang")
    stuck = threading.Thread(target=lambda: chat(served.url, served.model), daemon=True)
    stuck.start()
    time.sleep(1)
    assert livez(served.url) == 200, "a step in flight is not yet a stall"
    assert wait_for(lambda: livez(served.url) != 200, 15), "a step hung for over 3 s and the engine is still live"
    fault.unlink()
    stuck.join(30)
    assert "the engine is not alive" in served.log.read_text()


def test_a_model_that_cannot_load_ends_the_server_with_the_reason(bentoml_home, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALCON_")}
    env.update(BENTOML_HOME=str(bentoml_home), FALCON_MODEL="no-such-model", BENTOML_DO_NOT_TRACK="true")
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    started = time.monotonic()
    done = subprocess.run([str(bentoml_cli), "serve", "service:FalconService", "--host", "127.0.0.1", "--port", "0"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "model no-such-model is not in the store" in output and "stopping the server" in output
    assert time.monotonic() - started < 100, "the server ended well before any startup probe would give up"
