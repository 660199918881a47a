"""SIGTERM, as Kubernetes sends it on a rolling update: the server goes unready, turns new requests away
with a 503 and Retry-After, lets the streams in flight run to `[DONE]`, then exits; a drain cap ends
streams that would outlast it (with an error event, then `[DONE]`)."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import pytest

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Tell me about falcons."}]


def exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.1)
    return False


def long_stream(model: str, tokens: int) -> dict:
    return {"model": model, "messages": HELLO, "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}


def test_sigterm_drains_streams_to_done_and_turns_new_requests_away(make_server):
    server = make_server("drain")
    with httpx.Client(base_url=server.url, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json=long_stream(server.model, 400)) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        os.kill(server.pid, signal.SIGTERM)  # Kubernetes signals the container's main process
        time.sleep(0.3)
        turned_away = httpx.post(f"{server.url}/v1/chat/completions", timeout=10,
                                 json={"model": server.model, "messages": HELLO, "max_tokens": 2})
        ready = httpx.get(f"{server.url}/readyz", timeout=10)
        rest = [line for line in lines if line.startswith("data: ")]
    assert turned_away.status_code == 503
    assert int(turned_away.headers["retry-after"]) >= 1
    assert turned_away.json()["error"]["code"] == "shutting_down"
    assert ready.status_code == 503, "a draining server is not ready: Kubernetes takes it out of the Service"
    assert rest[-1] == "data: [DONE]"
    usage = json.loads(rest[-2].removeprefix("data: "))["usage"]
    assert usage["completion_tokens"] == 400, "the stream in flight ran to its end"
    assert exited(server.pid, 30), "the server did not exit after the drain"


def test_the_drain_cap_ends_what_would_outlast_it(make_server):
    server = make_server("capped", drain_timeout="1")
    with httpx.Client(base_url=server.url, timeout=60) as c, \
            c.stream("POST", "/v1/chat/completions", json=long_stream(server.model, 1900)) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        os.kill(server.pid, signal.SIGTERM)
        started = time.monotonic()
        rest = [line for line in lines if line.startswith("data: ")]
        took = time.monotonic() - started
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2].removeprefix("data: "))
    assert "shutting down" in error["error"]["message"]
    assert took < 30
    assert exited(server.pid, 30)
