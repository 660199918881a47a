"""The Gateway API Inference Extension's model server protocol (its proposal 003), on a real `bentoml serve`:
the OpenAI completions and chat APIs, and gauges of queued requests, running requests and KV-cache
utilization on /metrics under the names endpoint pickers read by default (vLLM's), with the semantics the
protocol gives them, equal to the service's own; and /metrics open to a scraper that has no API key (the
endpoint picker's and the PodMonitor's scrapes), with the series the ScaledObject's query reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from served import Server, serve

API_KEY = "protocol-test-key"
# What the endpoint picker reads by default (the Inference Extension's EPP options: total-queued-requests,
# total-running-requests, kv-cache-usage-percentage and cache-info metrics; before the vLLM rename, the
# KV metric was vllm:gpu_cache_usage_perc, which older pickers still default to).
PICKER_DEFAULTS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                   "vllm:gpu_cache_usage_perc", "vllm:cache_config_info")


@pytest.fixture(scope="module")
def server(store: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One sequence at a time (so that a second request waits), behind an API key."""
    home, tag = store
    with serve(home, tag.split(":")[0], tmp_path_factory.mktemp("protocol"), api_key=API_KEY,
               max_batch_size="1") as running:
        yield running


def scrape(server: Server) -> dict[str, list[tuple[dict[str, str], float]]]:
    """/metrics as a scraper without the API key reads it: name -> [(labels, value)] (the model's series)."""
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200, "a scraper without the API key is turned away"
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.labels.get("model_name") == server.model:
                samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    [(_, v)] = samples[name]
    return v


def stream(server: Server, tokens: int, done: list[int]) -> None:
    body = {"model": server.model, "prompt": "Falcons are", "max_tokens": tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        done.append(sum(1 for line in response.iter_lines() if line.startswith("data: {")))


def test_completions_and_chat_are_served(server: Server) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    completion = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=120,
                            json={"model": server.model, "prompt": "Falcons", "max_tokens": 4})
    chat = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": server.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert completion.json()["object"] == "text_completion" and chat.json()["object"] == "chat.completion"


def test_queue_running_and_kv_gauges_under_vllms_names(server: Server) -> None:
    idle = scrape(server)
    for name in PICKER_DEFAULTS:
        assert name in idle, f"{name} is not on /metrics"
    [(config, info)] = idle["vllm:cache_config_info"]
    assert info == 1 and config["block_size"] == "16"
    capacity = int(config["num_gpu_blocks"]) * 16  # the KV budget in tokens (a whole number of blocks here)
    assert capacity > 0
    # two long streams on a server that runs one sequence at a time: one runs, one waits
    finished: list[int] = []
    clients = [threading.Thread(target=stream, args=(server, 1500, finished)) for _ in range(2)]
    for client in clients:
        client.start()
        time.sleep(0.2)
    busy, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:
        samples = scrape(server)
        if value(samples, "vllm:num_requests_running") == 1 and value(samples, "vllm:num_requests_waiting") == 1:
            busy = samples
            break
        time.sleep(0.05)
    assert busy is not None, "never saw one request running and one waiting"
    # the protocol's gauges are the service's own values
    assert value(busy, "vllm:num_requests_waiting") == value(busy, "falcon_requests_waiting") == 1
    assert value(busy, "vllm:num_requests_running") == value(busy, "falcon_requests_running") == 1
    usage = value(busy, "vllm:kv_cache_usage_perc")
    assert value(busy, "vllm:gpu_cache_usage_perc") == value(busy, "falcon_kv_cache_usage_perc") == usage
    # KV-cache utilization: the fraction (0 to 1) of the KV budget that running sequences hold
    assert 0 < usage <= 1
    assert usage == pytest.approx(value(busy, "falcon_kv_cache_tokens") / capacity, abs=1e-9)
    for client in clients:
        client.join(timeout=120)
    assert finished and all(chunks > 0 for chunks in finished) and len(finished) == 2
    after = scrape(server)
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc"):
        assert value(after, name) == 0, name
