"""`FALCON_ENGINE_PROCESS=true` in a real `bentoml serve`: the engine core in a child process serves the OpenAI
API as in process, drains on SIGTERM and leaves with the server, and its death fails liveness at once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest
from test_e2e_shutdown import exited, long_stream

pytestmark = pytest.mark.e2e

MARK = "falcon_service.engine.process"


def engine_child(server_pid: int) -> int:
    """The pid of the engine process under the server's process tree."""
    parents: dict[int, int] = {}
    commands: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def under_server(pid: int) -> bool:
        while pid > 1:
            if pid == server_pid:
                return True
            pid = parents.get(pid, 1)
        return False

    found = [pid for pid, cmd in commands.items() if MARK in cmd and under_server(pid)]
    assert len(found) == 1, f"engine processes under the server: {found}"
    return found[0]


def test_the_engine_process_serves_and_drains_then_leaves_with_the_server(make_server):
    server = make_server("engine_process", engine_process="true")
    child = engine_child(server.pid)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(model=server.model, max_tokens=5,
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens >= 1
        streamed = client.chat.completions.create(model=server.model, max_tokens=6, stream=True,
                                                  messages=[{"role": "user", "content": "hi"}])
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    generated = [float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith("falcon_generation_tokens_total")]
    assert generated and generated[0] >= 2, "the requests' records reached the metrics"
    with httpx.Client(base_url=server.url, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json=long_stream(server.model, 300)) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        os.kill(server.pid, signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 300
    assert exited(server.pid, 30), "the server did not exit after the drain"
    assert exited(child, 30), "the engine process outlived the server"


def test_a_dead_engine_process_fails_liveness_at_once(make_server):
    server = make_server("engine_process_dies", engine_process="true")
    assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200
    os.kill(engine_child(server.pid), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/livez", timeout=10).status_code == 200:
        assert time.monotonic() < deadline, "the engine process died and the server is still live"
        time.sleep(0.2)
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=30, json={
        "model": server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert reply.status_code >= 500 and "error" in reply.json()
