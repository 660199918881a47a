"""The engine's measurements reach Prometheus: queue and batch gauges, latency histograms,
token counters, finish reasons and rejections."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM

from falcon_service.engine.engine import Engine, GenerationRequest, QueueFullError
from falcon_service.engine.sampling import SamplingParams
from falcon_service.engine.scheduler import BatchLimits
from falcon_service.metrics import ServiceMetrics

MODEL = "falcon-test"


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    v = reg.get_sample_value(name, {"model_name": MODEL, **labels})
    return 0.0 if v is None else v


async def eventually(check, timeout: float = 5.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


@pytest.fixture
def engine_and_registry(tiny_checkpoint, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    reg = CollectorRegistry()
    engine = Engine(model, tiny_tokenizer, BatchLimits(4, 4 * 2048, 2048, 1), observer=ServiceMetrics(MODEL, reg))
    yield engine, reg
    engine.shutdown()


async def test_metrics_follow_requests(engine_and_registry, tiny_tokenizer) -> None:
    engine, reg = engine_and_registry
    prompt = tuple(tiny_tokenizer.encode("Hello falcon"))

    done = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)))
    tokens = sum([len(e.token_ids) async for e in done])
    assert tokens == 5
    assert value(reg, "falcon_requests_finished_total", finish_reason="length") == 1
    assert value(reg, "falcon_prompt_tokens_total") == len(prompt)
    assert value(reg, "falcon_generation_tokens_total") == 5
    assert value(reg, "falcon_time_to_first_token_seconds_count") == 1
    assert value(reg, "falcon_time_per_output_token_seconds_count") == 1
    assert value(reg, "falcon_time_to_first_token_seconds_sum") > 0

    long = engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)))
    # the queue holds one request: while `long` waits or runs, fill the queue until one is rejected
    rejected = 0
    queued = []
    for _ in range(3):
        try:
            queued.append(engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=1))))
        except QueueFullError:
            rejected += 1
    assert rejected >= 1
    assert value(reg, "falcon_requests_rejected_total") == rejected
    first = await anext(aiter(long))
    assert first.token_ids
    # gauges are set at the end of each engine step
    assert await eventually(lambda: value(reg, "falcon_requests_running") >= 1)
    assert await eventually(lambda: value(reg, "falcon_kv_cache_tokens") > 0)
    long.abort()
    async for _ in long:
        pass
    for s in queued:
        async for _ in s:
            pass
    assert await eventually(lambda: value(reg, "falcon_requests_running") == 0)
    assert value(reg, "falcon_requests_waiting") == 0
    assert value(reg, "falcon_kv_cache_tokens") == 0
    assert value(reg, "falcon_requests_finished_total", finish_reason="abort") == 1


async def test_prefix_cache_hit_rate_and_kept_tokens(tiny_checkpoint, tiny_tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    reg = CollectorRegistry()
    engine = Engine(model, tiny_tokenizer, BatchLimits(2, 4 * 2048, 2048, 4), observer=ServiceMetrics(MODEL, reg),
                    prefix_caching=True)
    try:
        system = list(range(10, 10 + 48))  # three blocks
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        for suffix in ([1, 2, 3], [4, 5, 6, 7]):
            stream = engine.submit(GenerationRequest(tuple(system + suffix), params))
            async for _ in stream:
                pass
        assert stream.cached_tokens == 48
        assert value(reg, "falcon_prompt_tokens_total") == 51 + 52  # the hit rate's denominator
        # and the only count of prompt tokens: a counter of tokens looked up would always hold the same
        assert reg.get_sample_value("falcon_prefix_cache_queries_total", {"model_name": MODEL}) is None
        assert value(reg, "falcon_prefix_cache_hits_total") == 48
        assert value(reg, "falcon_prefix_cache_hit_rate") == pytest.approx(48 / 103)
        # both finished rows are kept for reuse: prompt + output, less the last token (never fed)
        assert await eventually(lambda: value(reg, "falcon_prefix_cache_tokens") == (51 + 1) + (52 + 1))
    finally:
        engine.shutdown()


def test_grammar_rejections_are_counted() -> None:
    """The engine reports a reply that broke its grammar (tests/engine/test_grammar.py injects one); it is
    counted where an alert can see it."""
    reg = CollectorRegistry()
    metrics = ServiceMetrics(MODEL, reg)
    assert reg.get_sample_value("falcon_grammar_rejections_total", {"model_name": MODEL}) == 0
    metrics.on_grammar_rejection()
    assert value(reg, "falcon_grammar_rejections_total") == 1
