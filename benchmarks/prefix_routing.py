"""Prefix-aware routing against round robin, over several replicas of the tiny model on this machine.

    .venv/bin/python benchmarks/prefix_routing.py                      # 2 replicas, 8 prefixes, both policies
    .venv/bin/python benchmarks/prefix_routing.py --prefixes 1         # compare.py's workload: one shared prefix

The workload is the shape of compare.py's prefix runs (aiperf's `--num-prefix-prompts K
--prefix-prompt-length L`): every request is one of K shared prefixes of L tokens, picked at random, then a
prompt of its own, streamed from /v1/chat/completions with `ignore_eos` and a fixed output length, from C
closed-loop clients. The replicas are `bentoml serve` processes of the tiny random model; the benchmark
routes each request itself (no proxy hop, the same for both policies):

  round-robin  replica i mod R, what a Service's spreading amounts to;
  prefix       a small prefix-aware picker in the manner of the endpoint picker's scorers and weights
               (overlays/inference-pool/plugins.yaml): 3 x the share of the prompt's blocks the replica was
               last sent (chained hashes of 64-character blocks, an LRU index per replica: the approximate
               prefix index), + 2 x its queue score (requests beyond its batch size, min-max normalized over
               the replicas, fewer is better), + 2 x its free KV share (running requests over its batch
               size); the highest score wins. The load figures are the router's own counts of requests in
               flight, where the endpoint picker scrapes the same gauges from /metrics.

Each policy runs on freshly started replicas (the prefix caches start empty) after a warm-up of requests
without the prefixes; the policies alternate order between repeats. Reported per policy: the prefix-cache
hit rate (prompt tokens the servers found cached, from each reply's usage, and the servers' own
falcon_prefix_cache_hits and falcon_prompt_tokens counters), TTFT p50/p95 and end-to-end latency as the
client saw them, output tok/s, and how the requests split over the replicas. Results go to
benchmarks/results/prefix-routing-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = BENCH_DIR / ".cache" / "prefix_routing"
BLOCK_CHARS = 64
PREFIX_WEIGHT, QUEUE_WEIGHT, KV_WEIGHT = 3.0, 2.0, 2.0  # plugins.yaml's
WORDS = ["falcon", "hawk", "kestrel", "merlin", "harrier", "eagle", "osprey", "kite", "buzzard", "owl", "wing",
         "feather", "talon", "beak", "sky", "wind", "cliff", "nest", "prey", "dive", "soar", "glide", "hunt", "river",
         "forest", "desert", "mountain", "dawn", "dusk", "flight", "speed"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- replicas


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen


def model_store() -> tuple[Path, str]:
    """The tiny random model in the benchmark's own store."""
    sys.path.insert(0, str(REPO_ROOT))
    from import_model import import_random

    home = CACHE_DIR / "store"
    return home, str(import_random("tiny", bentoml_home=home))


def start_replicas(count: int, store: Path, tag: str, settings: dict[str, str], run_dir: Path) -> list[Replica]:
    replicas = []
    for i in range(count):
        home = run_dir / f"replica{i}_home"  # each `bentoml serve` wipes its home's metrics at start
        home.mkdir(parents=True, exist_ok=True)
        if not (home / "models").exists():
            (home / "models").symlink_to(store / "models", target_is_directory=True)
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FALCON_")}
        env.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", FALCON_MODEL=tag.split(":")[0],
                   FALCON_DEVICE="cpu", **{f"FALCON_{k.upper()}": v for k, v in settings.items()})
        out = (run_dir / f"replica{i}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service:FalconService", "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=REPO_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        replicas.append(Replica(f"http://127.0.0.1:{port}", proc))
    deadline = time.monotonic() + 300
    for replica in replicas:
        while True:
            if replica.proc.poll() is not None:
                raise SystemExit(f"a replica exited with {replica.proc.returncode}; see {run_dir}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{replica.url}/readyz", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"replicas not ready in 300 s; see {run_dir}")
            time.sleep(0.5)
    return replicas


def stop_replicas(replicas: list[Replica]) -> None:
    for replica in replicas:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(replica.proc.pid, signal.SIGTERM)
    for replica in replicas:
        try:
            replica.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(replica.proc.pid, signal.SIGKILL)
            replica.proc.wait(timeout=10)


def prefix_counters(url: str) -> tuple[float, float]:
    """(prompt tokens, those found in the prefix cache) from a replica's falcon_prompt_tokens and
    falcon_prefix_cache_hits counters."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = {m.group(1): float(m.group(2)) for m in
             re.finditer(r"^falcon_(prompt_tokens|prefix_cache_hits)_total\{[^}]*\} (\S+)$", text, re.M)}
    return found.get("prompt_tokens", 0.0), found.get("prefix_cache_hits", 0.0)


# ---------------------------------------------------------------- routing


def block_hashes(text: str) -> list[bytes]:
    """Chained hashes of the text's whole blocks: one hash stands for the whole prefix up to its block."""
    hashes, previous = [], b""
    for start in range(0, len(text) - BLOCK_CHARS + 1, BLOCK_CHARS):
        previous = hashlib.blake2b(previous + text[start:start + BLOCK_CHARS].encode(), digest_size=8).digest()
        hashes.append(previous)
    return hashes


class PrefixRouter:
    """Which replica was last sent each block (an LRU index per replica), and requests in flight."""

    def __init__(self, replicas: int, blocks_per_replica: int, batch_size: int) -> None:
        self.index = [OrderedDict() for _ in range(replicas)]
        self.capacity = blocks_per_replica
        self.batch_size = batch_size
        self.in_flight = [0] * replicas

    def pick(self, text: str) -> int:
        hashes = block_hashes(text)
        waiting = [max(0, n - self.batch_size) for n in self.in_flight]
        low, high = min(waiting), max(waiting)
        scores = []
        for i, index in enumerate(self.index):
            matched = 0
            for h in hashes:
                if h not in index:
                    break
                matched += 1
            prefix = matched / len(hashes) if hashes else 0.0
            queue = 1.0 - (waiting[i] - low) / (high - low) if high > low else 1.0
            free_kv = 1.0 - min(self.in_flight[i], self.batch_size) / self.batch_size
            score = PREFIX_WEIGHT * prefix + QUEUE_WEIGHT * queue + KV_WEIGHT * free_kv
            scores.append((score, -self.in_flight[i], -i))
        chosen = max(range(len(scores)), key=scores.__getitem__)
        index = self.index[chosen]
        for h in hashes:
            index[h] = True
            index.move_to_end(h)
        while len(index) > self.capacity:
            index.popitem(last=False)
        return chosen


class RoundRobin:
    def __init__(self, replicas: int) -> None:
        self.next = 0
        self.replicas = replicas
        self.in_flight = [0] * replicas

    def pick(self, text: str) -> int:
        chosen, self.next = self.next, (self.next + 1) % self.replicas
        return chosen


# ---------------------------------------------------------------- load


@dataclass
class Result:
    replica: int
    ttft: float
    e2e: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class Workload:
    prefixes: list[str]
    prompts: list[tuple[int, str]] = field(default_factory=list)  # (prefix index, user text)


def words(rng: random.Random, tokenizer, tokens: int) -> str:
    """Random words cut to `tokens` tokens of the model's tokenizer."""
    text = " ".join(rng.choice(WORDS) for _ in range(tokens * 2))
    return tokenizer.decode(tokenizer(text)["input_ids"][:tokens])


def make_workload(args: argparse.Namespace, tokenizer) -> Workload:
    rng = random.Random(args.seed)
    prefixes = [f"[{k}] " + words(rng, tokenizer, args.prefix_tokens) for k in range(args.prefixes)]
    work = Workload(prefixes)
    for n in range(args.requests):
        k = rng.randrange(args.prefixes)
        work.prompts.append((k, f"{prefixes[k]}\nQuestion {n}: {words(rng, tokenizer, args.prompt_tokens)}"))
    return work


async def one_request(client: httpx.AsyncClient, url: str, text: str, max_tokens: int) -> tuple[float, float, dict]:
    body = {"model": "falcon-tiny-random", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, usage = None, {}
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        pending = b""
        async for chunk in response.aiter_bytes():
            # SSE lines end at \n only: random-weight text may hold U+2028 and the like, raw in the JSON,
            # where a str.splitlines-style reader (httpx's aiter_lines) would cut an event in two
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if ttft is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                    ttft = time.perf_counter() - start
                if event.get("usage"):
                    usage = event["usage"]
    return ttft if ttft is not None else float("nan"), time.perf_counter() - start, usage


async def run_load(replicas: list[Replica], router, prompts: list[tuple[int, str]], args) -> list[Result]:
    queue = list(reversed(prompts))
    results: list[Result] = []
    async with httpx.AsyncClient(timeout=300) as client:
        async def worker() -> None:
            while queue:
                _, text = queue.pop()
                chosen = router.pick(text)
                router.in_flight[chosen] += 1
                try:
                    ttft, e2e, usage = await one_request(client, replicas[chosen].url, text, args.max_tokens)
                finally:
                    router.in_flight[chosen] -= 1
                details = usage.get("prompt_tokens_details") or {}
                results.append(Result(chosen, ttft, e2e, usage.get("prompt_tokens", 0),
                                      details.get("cached_tokens", 0), usage.get("completion_tokens", 0)))
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return results


def warm_up(replicas: list[Replica], tokenizer, args) -> None:
    """A few requests on each replica with no shared prefix (first-request costs), then wait for idle."""
    rng = random.Random(args.seed + 99)

    async def go() -> None:
        async with httpx.AsyncClient(timeout=300) as client:
            await asyncio.gather(*(one_request(client, r.url, f"warm {i} " + words(rng, tokenizer, 48), 16)
                                   for r in replicas for i in range(args.concurrency)))
    asyncio.run(go())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(policy: str, results: list[Result], seconds: float, counters: list[tuple[float, float]],
              replicas: int) -> dict:
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    counted = sum(p for p, _ in counters)
    hits = sum(h for _, h in counters)
    ttfts = [r.ttft * 1000 for r in results]
    return {
        "policy": policy, "requests": len(results), "seconds": round(seconds, 1),
        "hit_rate_usage": round(cached / prompt, 4) if prompt else None,
        "hit_rate_counters": round(hits / counted, 4) if counted else None,
        "prompt_tokens_mean": round(prompt / len(results), 1),
        "ttft_p50_ms": round(statistics.median(ttfts), 1), "ttft_p95_ms": round(percentile(ttfts, 95), 1),
        "e2e_p50_ms": round(statistics.median(r.e2e * 1000 for r in results), 1),
        "output_tok_s": round(sum(r.completion_tokens for r in results) / seconds, 1),
        "per_replica": [sum(r.replica == i for r in results) for i in range(replicas)],
    }


def run_policy(policy: str, args, store: Path, tag: str, work: Workload, tokenizer, run_dir: Path) -> dict:
    settings = {"max_batch_size": str(args.max_batch_size), "torch_threads": "1"}
    replicas = start_replicas(args.replicas, store, tag, settings, run_dir / policy)
    try:
        warm_up(replicas, tokenizer, args)
        before = [prefix_counters(r.url) for r in replicas]
        # what a replica's prefix cache keeps when its batch is full, about: the rows beside the running
        # ones (as many as the batch) of whole prompts
        prompt_chars = max(len(text) for _, text in work.prompts)
        router = (PrefixRouter(args.replicas, args.max_batch_size * (prompt_chars // BLOCK_CHARS + 1),
                               args.max_batch_size) if policy == "prefix" else RoundRobin(args.replicas))
        start = time.perf_counter()
        results = asyncio.run(run_load(replicas, router, work.prompts, args))
        seconds = time.perf_counter() - start
        after = [prefix_counters(r.url) for r in replicas]
        counters = [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]
        return summarize(policy, results, seconds, counters, args.replicas)
    finally:
        stop_replicas(replicas)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--prefixes", type=int, default=8, help="shared prefixes (aiperf's --num-prefix-prompts)")
    p.add_argument("--prefix-tokens", type=int, default=1024, help="tokens of each (--prefix-prompt-length)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="each request's own prompt tokens (--isl)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens (--osl, ignore_eos)")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop clients")
    p.add_argument("--requests", type=int, default=160, help="requests per policy and repeat")
    p.add_argument("--max-batch-size", type=int, default=4,
                   help="FALCON_MAX_BATCH_SIZE of each replica (its prefix cache keeps as many rows again)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--policies", default="prefix,round-robin")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()

    from transformers import AutoTokenizer

    store, tag = model_store()
    sys.path.insert(0, str(REPO_ROOT))
    from import_model import get_model

    tokenizer = AutoTokenizer.from_pretrained(get_model(tag, bentoml_home=store).path)
    work = make_workload(args, tokenizer)
    run_dir = BENCH_DIR / "results" / f"prefix-routing-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=True)
    policies = args.policies.split(",")
    rows = []
    for repeat in range(args.repeats):
        for policy in policies if repeat % 2 == 0 else list(reversed(policies)):
            log(f"repeat {repeat + 1}: {policy} on {args.replicas} fresh replicas")
            row = {"repeat": repeat + 1, **run_policy(policy, args, store, tag, work, tokenizer, run_dir)}
            log(json.dumps(row))
            rows.append(row)
    (run_dir / "results.json").write_text(json.dumps({"args": vars(args), "model": tag, "rows": rows}, indent=2))
    print("\n| repeat | policy | hit rate (usage) | hit rate (counters) | TTFT p50 ms | TTFT p95 ms | e2e p50 ms "
          "| output tok/s | requests per replica |\n|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['repeat']} | {r['policy']} | {r['hit_rate_usage']:.1%} | {r['hit_rate_counters']:.1%} | "
              f"{r['ttft_p50_ms']} | {r['ttft_p95_ms']} | {r['e2e_p50_ms']} | {r['output_tok_s']} | "
              f"{r['per_replica']} |")
    print(f"\nwritten to {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
