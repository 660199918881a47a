"""End-to-end fixtures: a tiny random Falcon in a temporary BENTOML_HOME, served by a real `bentoml serve`.

Servers are session-scoped (each start costs several seconds): one with default settings for
most tests, one with an API key and a zero-length queue for the 401 and 429 tests, one with a
two-row batch and a two-request queue for the backpressure tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
API_KEY = "e2e-secret-key"
_LOGS: list[Path] = []  # every server log of the session, attached to failing e2e tests


@dataclass(frozen=True)
class Served:
    """A running server: where it listens, the model id it serves, where its output goes."""

    url: str
    model: str
    log: Path
    api_key: str | None = None
    pid: int = 0  # the `bentoml serve` process (its workers are its children)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_text(path: Path, tail: int = 20_000) -> str:
    try:
        return path.read_text(errors="replace")[-tail:]
    except OSError as e:
        return f"<no server log: {e}>"


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the whole process group of the server; SIGKILL whatever outlives the grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=20)
    with contextlib.suppress(ProcessLookupError):  # workers that outlived the arbiter, or an ignored SIGTERM
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


# `FALCON_TEST_SERVE_ENV="FALCON_X=1,FALCON_Y=2"`: settings for every server of the run (e.g. the whole e2e tier
# with FALCON_ENGINE_PROCESS=true); a test's own settings come after them
SERVE_ENV = dict(item.split("=", 1) for item in os.environ.get("FALCON_TEST_SERVE_ENV", "").split(",") if item)


def _serve(home: Path, model: str, log_path: Path, target: str = "service:FalconService", env_extra: dict | None = None,
           **settings: str) -> Iterator[Served]:
    """Run `bentoml serve <target>` until the generator is closed; yield once /health is 200."""
    port = _free_port()
    # Each `bentoml serve` wipes $BENTOML_HOME/prometheus_multiproc_dir at start, which would blank the
    # metrics of the servers already running: each server gets a home of its own sharing the model store.
    own_home = log_path.parent / f"{log_path.stem}_bentoml_home"
    own_home.mkdir(exist_ok=True)
    if not (own_home / "models").exists():
        (own_home / "models").symlink_to(home / "models", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALCON_")}
    env.update(BENTOML_HOME=str(own_home), FALCON_MODEL=model, BENTOML_DO_NOT_TRACK="true", PYTHONUNBUFFERED="1")
    env.update(SERVE_ENV)
    env.update({f"FALCON_{k.upper()}": v for k, v in settings.items()})
    env.update(env_extra or {})
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    cmd = [str(bentoml_cli), "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    _LOGS.append(log_path)
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`bentoml serve` exited with {proc.returncode} before it was ready; "
                            f"log {log_path}:\n{_log_text(log_path)}", pytrace=False)
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`bentoml serve` was not ready after {STARTUP_TIMEOUT_S:.0f} s; "
                            f"log {log_path}:\n{_log_text(log_path)}", pytrace=False)
            time.sleep(0.25)
        yield Served(url, model, log_path, settings.get("api_key"), proc.pid)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bentoml_home")


@pytest.fixture(scope="session")
def model_tag(bentoml_home: Path):
    """The tiny random checkpoint, imported into the temporary store."""
    from import_model import import_random

    return import_random("tiny", bentoml_home=bentoml_home)


@pytest.fixture(scope="session")
def model_config(bentoml_home: Path, model_tag) -> dict:
    """The served checkpoint's config.json (eos id, context length)."""
    from import_model import get_model

    return json.loads((Path(get_model(model_tag, bentoml_home=bentoml_home).path) / "config.json").read_text())


@pytest.fixture(scope="session")
def server(bentoml_home: Path, model_tag, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The default server: no API key, default queue."""
    log = tmp_path_factory.mktemp("server_logs") / "default.log"
    yield from _serve(bentoml_home, model_tag.name, log)


@pytest.fixture(scope="session")
def guarded_server(bentoml_home: Path, model_tag, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server with an API key and `max_queue_size=0`: every generation request is rejected with 429."""
    log = tmp_path_factory.mktemp("server_logs") / "guarded.log"
    yield from _serve(bentoml_home, model_tag.name, log, api_key=API_KEY, max_queue_size="0")


@pytest.fixture(scope="session")
def narrow_server(bentoml_home: Path, model_tag, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server that decodes two sequences at a time and lets two more wait: the backpressure tests."""
    log = tmp_path_factory.mktemp("server_logs") / "narrow.log"
    yield from _serve(bentoml_home, model_tag.name, log, max_batch_size="2", max_queue_size="2")


@pytest.fixture(scope="session")
def edge_server(bentoml_home: Path, model_tag, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server with the front door's limits set low for the hardening tests: the key guards everything
    but the probes, 64 KiB bodies, 2 s to send a request head or the next piece of a body."""
    log = tmp_path_factory.mktemp("server_logs") / "edge.log"
    yield from _serve(bentoml_home, model_tag.name, log, api_key=API_KEY, api_key_scope="all",
                      max_body_bytes="65536", head_timeout="2", body_timeout="2")


@pytest.fixture
def make_server(bentoml_home: Path, model_tag, tmp_path: Path):
    """Start a server of its own for one test (one the test may stop); stopped after the test."""
    started = []

    def make(name: str, target: str = "service:FalconService", env_extra: dict | None = None, **settings: str
             ) -> Served:
        gen = _serve(bentoml_home, model_tag.name, tmp_path / f"{name}.log", target, env_extra, **settings)
        started.append(gen)
        return next(gen)

    yield make
    for gen in started:
        gen.close()


@pytest.fixture(scope="session")
def client(server: Served) -> Iterator[openai.OpenAI]:
    """The official client against the default server; no retries, so a 429 or 5xx shows as it is."""
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def http(server: Served) -> Iterator[httpx.Client]:
    """A raw HTTP client against the default server, for checks of the wire format."""
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Attach the tail of every server log to a failing e2e test's report."""
    report = yield
    if report.when == "call" and report.failed and "e2e" in item.keywords:
        for path in _LOGS:
            report.sections.append((f"server log {path.name} (tail)", _log_text(path, 6000)))
    return report
