"""Backpressure and cancellation against a real server: clients that hang up free their sequences
at once (seen in /metrics), a full queue answers 429 at once, and no accepted request is lost."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_metrics import delta, metrics, wait_idle

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "Tell me about falcons."}]


def long_chat(model: str, stream: bool) -> dict:
    # about 2000 tokens: minutes of work if nobody stopped it
    return {"model": model, "messages": HELLO, "max_tokens": 1900, "ignore_eos": True, "stream": stream}


def test_streams_that_hang_up_are_aborted_and_the_engine_is_idle_again(server):
    before = metrics(server.url)
    with contextlib.ExitStack() as stack:
        for _ in range(8):
            c = stack.enter_context(httpx.Client(base_url=server.url, timeout=30))
            r = stack.enter_context(c.stream("POST", "/v1/chat/completions", json=long_chat(server.model, True)))
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            assert '"role":"assistant"' in first
    # all eight clients hung up
    after = wait_idle(server.url, before, aborts=8)
    assert after["falcon_requests_running"] == 0
    assert after["falcon_requests_waiting"] == 0
    assert after["falcon_kv_cache_tokens"] == 0
    assert delta(before, after, "falcon_requests_finished_total:abort") == 8
    assert delta(before, after, "falcon_requests_finished_total:length") == 0
    # the next request is served, and usage of the aborted ones was logged
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": server.model, "messages": HELLO, "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    assert "request aborted after" in server.log.read_text()


def test_a_non_streaming_client_that_hangs_up_is_aborted(server):
    before = metrics(server.url)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=long_chat(server.model, False), timeout=1.0)
    after = wait_idle(server.url, before, aborts=1)
    assert after["falcon_requests_running"] == 0 and after["falcon_kv_cache_tokens"] == 0
    assert delta(before, after, "falcon_requests_finished_total:abort") == 1


def test_full_queue_rejects_at_once_and_accepted_requests_all_complete(narrow_server):
    body = {"model": narrow_server.model, "messages": HELLO, "max_tokens": 400, "ignore_eos": True}

    def call(_: int) -> httpx.Response:
        return httpx.post(f"{narrow_server.url}/v1/chat/completions", json=body, timeout=120)

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(call, range(12)))
    accepted = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 429]
    assert len(accepted) + len(rejected) == 12, [r.status_code for r in responses]
    # the queue holds two requests not yet admitted (admission happens on the engine thread, so a burst
    # can fill the queue before the engine has moved anything into its two rows)
    assert len(accepted) >= 2
    assert rejected, "12 simultaneous requests should overflow 2 rows + 2 queue places"
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
    for r in accepted:  # never dropped: every accepted request ran to its full length
        data = r.json()
        assert data["choices"][0]["finish_reason"] == "length"
        assert data["usage"]["completion_tokens"] == 400
    after = wait_idle(narrow_server.url)
    assert after["falcon_requests_rejected_total"] == len(rejected)
