"""The engine's host work per step, apart from the device's: what the GPU issue's point 5 must decide on.

On a GPU the step loop's thread launches a step and then does the host work (the scheduler's plan, the step's
index lists, reading the sampled tokens back, detokenizing, stop strings, events) while the device runs it; if
that work takes longer than the device's step, the device waits. This measures it on any machine, without a GPU:
the engine runs in process on the tiny random model (its forward and sampling take little, and are timed and
taken out), with N streams of 64 output tokens decoding together, their events consumed on the event loop as
the server's SSE loop consumes them. The figure is host milliseconds per step at each N, to set against the
device's step time at the same N (the GPU check's graphed decode step: 5.86 ms at 64 rows on an H200).

    .venv/bin/python benchmarks/host_overhead.py --streams 64,256

The host figures depend on this machine's CPU; the GPU machine's CPU is another. The event loop here does less
than the server's (no HTTP, no SSE formatting), so the figures are a floor of the server's host work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from falcon_service.api.routes import create_app  # noqa: E402
from falcon_service.api.serving import OpenAIServing  # noqa: E402
from falcon_service.checkpoints import build_random_checkpoint  # noqa: E402
from falcon_service.engine import EngineClient  # noqa: E402
from falcon_service.engine import engine as engine_module  # noqa: E402
from falcon_service.engine.batch import RunningBatch  # noqa: E402
from falcon_service.engine.engine import Engine, GenerationRequest, SamplingParams  # noqa: E402
from falcon_service.engine.loader import load_model  # noqa: E402
from falcon_service.engine.scheduler import BatchLimits  # noqa: E402

MODEL = "falcon"


class DeviceClock:
    """CPU time inside the model's forward and the sampler (the device's work on a GPU; it includes building
    the step's index lists, host work, so the host figures are a floor), and the steps."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0

    def wrap(self, fn, count: bool):
        def timed(*args, **kwargs):
            start = time.thread_time()  # CPU time of the engine's thread: a wait for the GIL is not the device's
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start
                self.steps += count
        return timed


def thread_cpu(thread) -> float:
    """CPU seconds a thread has used so far (Linux: its own CPU clock)."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


async def one_level(engine: Engine, tokenizer, streams: int, output_tokens: int, clock: DeviceClock,
                    api: httpx.AsyncClient | None) -> dict:
    """`streams` requests at once; their events consumed directly (`api` None) or as the OpenAI app's SSE."""
    async def direct(i: int) -> int:
        ids = tokenizer.encode(f"Request {i}: the falcon is a bird of prey " * 4)[:32]
        stream = engine.submit(GenerationRequest(tuple(ids), SamplingParams(
            max_tokens=output_tokens, temperature=1.0, ignore_eos=True)))
        made = 0
        async for event in stream:
            made += len(event.token_ids)
        return made

    async def through_api(i: int) -> int:
        assert api is not None
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Request {i}: the falcon is a bird"}],
                "max_tokens": output_tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        async with api.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            usage = None
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                    usage = json.loads(line[len("data: "):]).get("usage") or usage
        return usage["completion_tokens"] if usage else 0

    client = direct if api is None else through_api
    await client(-1)  # warm-up
    clock.seconds, clock.steps = 0.0, 0
    loop_cpu, engine_cpu = time.thread_time(), thread_cpu(engine._thread)
    start = time.perf_counter()
    tokens = sum(await asyncio.gather(*(client(i) for i in range(streams))))
    wall = time.perf_counter() - start
    loop_cpu, engine_cpu = time.thread_time() - loop_cpu, thread_cpu(engine._thread) - engine_cpu
    steps = clock.steps
    return {"streams": streams, "tokens": tokens, "steps": steps, "wall_ms_per_step": 1000 * wall / steps,
            "device_ms_per_step": 1000 * clock.seconds / steps,
            "engine_host_ms_per_step": 1000 * (engine_cpu - clock.seconds) / steps,
            "event_loop_ms_per_step": 1000 * loop_cpu / steps,
            "host_us_per_token": 1e6 * (engine_cpu - clock.seconds + loop_cpu) / tokens}


async def run_level(engine: Engine, tokenizer, streams: int, output_tokens: int, clock: DeviceClock, mode: str
                    ) -> dict:
    if mode == "engine":
        return await one_level(engine, tokenizer, streams, output_tokens, clock, None)
    serving = OpenAIServing(MODEL)
    serving.attach(EngineClient(engine))
    transport = httpx.ASGITransport(app=create_app(serving))
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=600) as api:
        return await one_level(engine, tokenizer, streams, output_tokens, clock, api)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", default="64,256", help="concurrent streams per level")
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--modes", default="engine,api", help="engine: events consumed directly; api: through the "
                   "OpenAI app's SSE (in process, httpx's ASGI transport)")
    p.add_argument("--repeats", type=int, default=3, help="runs per level; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine (the device's stand-in)")
    a = p.parse_args(argv)
    levels = [int(s) for s in a.streams.split(",")]
    clock = DeviceClock()
    RunningBatch._forward = clock.wrap(RunningBatch._forward, count=True)  # type: ignore[method-assign]
    engine_module.sample = clock.wrap(engine_module.sample, count=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_random_checkpoint(Path(tmp) / "tiny", "tiny")
        model, tokenizer = load_model(path, "cpu", torch.float32)
        engine = Engine(model, tokenizer, BatchLimits(max(levels), max(levels) * 2048, 512, 4 * max(levels)),
                        threads=a.threads)
        results = []
        try:
            for mode in a.modes.split(","):
                for streams in levels:
                    runs = [asyncio.run(run_level(engine, tokenizer, streams, a.output_tokens, clock, mode))
                            for _ in range(a.repeats)]
                    runs.sort(key=lambda r: r["engine_host_ms_per_step"] + r["event_loop_ms_per_step"])
                    median = {"mode": mode, **runs[len(runs) // 2]}
                    results.append(median)
                    print(f"{mode}, {streams} streams: engine thread's host work "
                          f"{median['engine_host_ms_per_step']:.2f} "
                          f"ms a step, event loop {median['event_loop_ms_per_step']:.2f} ms "
                          f"({median['host_us_per_token']:.1f} us a token in all); device stand-in "
                          f"{median['device_ms_per_step']:.2f} ms; wall {median['wall_ms_per_step']:.2f} ms a step; "
                          f"{median['steps']} steps", flush=True)
        finally:
            engine.shutdown()
    print(json.dumps({"torch": torch.__version__, "median_of": a.repeats, "levels": results}, indent=2))
    return 0 if results and all(r["tokens"] == r["streams"] * a.output_tokens for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
