"""A real `bentoml serve` of the tiny random model for the packaging checks that need a running server
(the metrics an endpoint picker and Prometheus scrape, the drain that scripts/image_check.sh checks)."""

from __future__ import annotations

import contextlib
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

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class Server:
    url: str
    model: str
    pid: int
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listens(pid: int, port: int) -> bool:
    """Whether the process `pid` or one of its children listens on `port` (not some other server that took
    the port between free_port() and the bind: other test runs on the machine start servers too)."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections("tcp")):
                return True
    return False


@contextlib.contextmanager
def serve(store_home: Path, model: str, workdir: Path, **settings: str) -> Iterator[Server]:
    """`bentoml serve service:FalconService` on a free port with FALCON_<KEY>=value settings, a BentoML home
    of its own in `workdir` sharing the models of `store_home`; stopped (its whole group) on exit."""
    for _ in range(3):
        try:
            with _serve(store_home, model, workdir, **settings) as server:
                yield server
                return
        except PortTaken:
            continue
    raise RuntimeError("three free ports in a row were taken before the server could bind them")


class PortTaken(RuntimeError):
    pass


@contextlib.contextmanager
def _serve(store_home: Path, model: str, workdir: Path, **settings: str) -> Iterator[Server]:
    home = workdir / "bentoml_home"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(store_home / "models", target_is_directory=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALCON_")}
    env.update(BENTOML_HOME=str(home), FALCON_MODEL=model, BENTOML_DO_NOT_TRACK="true", PYTHONUNBUFFERED="1")
    env.update({f"FALCON_{k.upper()}": v for k, v in settings.items()})
    log = workdir / "server.log"
    cmd = [str(Path(sys.executable).with_name("bentoml")), "serve", "service:FalconService", "--host", "127.0.0.1",
           "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    if not listens(proc.pid, port):
                        raise PortTaken(port)
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready in {STARTUP_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.25)
        yield Server(url, model, proc.pid, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
