"""Closed-loop streaming load generator for any OpenAI-compatible endpoint.

C concurrent clients each send one streaming request at a time until N requests are done,
with a fixed output length (`max_tokens`, plus `ignore_eos` where the server takes it).
Output tokens are counted by tokenizing the received text with the checkpoint's tokenizer
(the same method for every server, also for one that reports no usage); `usage` is recorded
beside it when the server sends it.

    python benchmarks/loadgen.py --base-url http://127.0.0.1:3000 --tokenizer CKPT_DIR \
        --concurrency 1,4,16,32 --num-requests 64 --max-tokens 64 --ignore-eos --out run.json

Memory check (RSS of a server's process tree after 50 and after 500 requests):

    python benchmarks/loadgen.py --base-url ... --tokenizer CKPT_DIR --rss-check --pid SERVER_PID
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

# The load generator shares the machine with the server: keep its own work per chunk small
# (no tokenizing while requests run; that happens after each level).

_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
_TEXT = "the falcon is a bird of prey and the model answers questions large language models predict tokens"
_WORDS = _TEXT.split(" ")


@dataclass
class LoadConfig:
    """What to send and how: one object so compare.py can drive runs without a CLI."""

    base_url: str
    model: str | None = None
    endpoint: str = "chat"  # "chat" -> /v1/chat/completions, "completions" -> /v1/completions
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    num_requests: int = 64
    max_tokens: int = 64
    ignore_eos: bool = False
    max_tokens_counts_prompt: bool = False  # the seed baseline passes max_tokens as max_length
    include_usage: bool = True  # send stream_options.include_usage
    tokenizer: str | None = None
    prompt_len: int = 32
    warmup: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    timeout_s: float = 600.0
    pid: int | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None


@dataclass
class RequestResult:
    """One streamed request as the client saw it; times in seconds from its own start."""

    index: int
    ok: bool
    error: str | None = None
    start: float = 0.0  # wall-clock offset from the level start
    ttft: float | None = None
    e2e: float | None = None
    chunk_times: list[float] = field(default_factory=list)  # arrival of each non-empty delta
    text: str = ""
    usage_completion_tokens: int | None = None
    prompt_tokens_sent: int | None = None
    tokens: int | None = None  # filled after the level: tokenizer count of `text`
    saw_done: bool = False  # `data: [DONE]` arrived (transformers serve ends without it)


# ---------------------------------------------------------------- prompts and tokens


class TokenCounter:
    """Counts tokens with the checkpoint's tokenizer, or approximates by words without one."""

    def __init__(self, path: str | None):
        self.path = path
        self._tok = None
        if path:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(path)

    @property
    def exact(self) -> bool:
        return self._tok is not None

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._tok is None:
            return max(1, round(len(text.split()) * 1.3))
        return len(self._tok.encode(text, add_special_tokens=False))

    def truncate(self, text: str, n: int) -> str:
        if self._tok is None:
            return " ".join(text.split()[: max(1, round(n / 1.3))])
        ids = self._tok.encode(text, add_special_tokens=False)[:n]
        return self._tok.decode(ids)


def make_prompt(index: int, prompt_len: int, counter: TokenCounter) -> str:
    """A deterministic prompt of about `prompt_len` tokens, distinct per index (no prefix-cache hits)."""
    rng = random.Random(1000 + index)
    words = [f"Request {index}:"]
    while len(words) < prompt_len * 2 + 8:
        words.append(rng.choice(_WORDS) if rng.random() < 0.5 else "".join(rng.choices(_SYLLABLES, k=2)))
    text = " ".join(words)
    return counter.truncate(text, prompt_len).strip()


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) without numpy."""
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ---------------------------------------------------------------- process memory


def tree_rss_bytes(pid: int) -> int | None:
    """RSS of a process and all its descendants (bentoml and vLLM run worker processes)."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):  # a worker that exited meanwhile
            total += p.memory_info().rss
    return total


def _tree_pids(pid: int | None) -> set[int]:
    import psutil

    if pid is None:
        return set()
    try:
        root = psutil.Process(pid)
        return {pid, *(c.pid for c in root.children(recursive=True))}
    except psutil.Error:
        return set()


def _process_cpu() -> dict[int, tuple[str, float]]:
    """CPU seconds (own + reaped children) of every process now, with its name (never its command line)."""
    import psutil

    out = {}
    for p in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = (
                f"{p.info.get('name') or '?'} (pid {p.pid})",
                t.user + t.system + t.children_user + t.children_system,
            )
    return out


class ContentionMeter:
    """CPU used by processes other than the server tree and this client while a level runs.

    Machine-wide busy time (/proc/stat, which also sees processes that came and went) minus the
    server tree's and our own; as a share of wall time x cores it says how much other work on the
    machine skewed the level. The busiest of those other processes are named.
    """

    def __init__(self, pid: int | None):
        self.pid = pid

    @staticmethod
    def _busy() -> float:
        import psutil

        ct = psutil.cpu_times()
        return ct.user + ct.nice + ct.system + getattr(ct, "irq", 0.0) + getattr(ct, "softirq", 0.0)

    def __enter__(self) -> ContentionMeter:
        self.result: dict[str, Any] | None = None
        try:
            import psutil
        except ImportError:
            self.t0 = None
            return self
        self.t0 = time.perf_counter()
        self.busy0 = self._busy()
        self.steal0 = getattr(psutil.cpu_times(), "steal", 0.0)
        self.procs0 = _process_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.t0 is None:
            return
        import psutil

        wall = time.perf_counter() - self.t0
        busy = self._busy() - self.busy0
        procs1 = _process_cpu()
        tree = _tree_pids(self.pid)
        me = os.getpid()
        server = mine = 0.0
        others: list[tuple[float, str]] = []
        for pid, (cmd, cpu1) in procs1.items():
            delta = cpu1 - self.procs0.get(pid, (cmd, 0.0))[1]
            if pid in tree:
                server += delta
            elif pid == me:
                mine += delta
            elif delta > 0:
                others.append((delta, cmd))
        cores = psutil.cpu_count() or 1
        share = wall * cores
        others.sort(reverse=True)
        self.result = {
            "server_cpu_share": round(server / share, 3),
            "client_cpu_share": round(mine / share, 3),
            "other_cpu_share": round(max(0.0, busy - server - mine) / share, 3),
            # time the hypervisor gave our vCPUs to other machines
            "steal_share": round((getattr(psutil.cpu_times(), "steal", 0.0) - self.steal0) / share, 3),
            "busiest_others": [{"process": c, "cpu_share": round(d / share, 3)} for d, c in others[:3]],
        }


# ---------------------------------------------------------------- one request


def _body(cfg: LoadConfig, model: str, prompt: str, prompt_tokens: int) -> dict[str, Any]:
    max_tokens = cfg.max_tokens + (prompt_tokens if cfg.max_tokens_counts_prompt else 0)
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
    }
    if cfg.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if cfg.include_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update(cfg.extra_body)
    return body


def _delta_text(chunk: dict[str, Any], endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta") or choice.get("message") or {}
        return delta.get("content") or ""
    return choice.get("text") or ""


async def stream_one(
    client: httpx.AsyncClient,
    cfg: LoadConfig,
    model: str,
    index: int,
    prompt: str,
    prompt_tokens: int,
    level_t0: float,
) -> RequestResult:
    """Send one streaming request and time every non-empty content delta."""
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    res = RequestResult(index=index, ok=False, prompt_tokens_sent=prompt_tokens)
    t0 = time.perf_counter()
    res.start = t0 - level_t0
    parts: list[str] = []
    try:
        async with client.stream("POST", path, json=_body(cfg, model, prompt, prompt_tokens)) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                res.error = f"HTTP {resp.status_code}: {body[:300]}"
                return res
            done = finished = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                now = time.perf_counter() - t0
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    res.error = f"bad SSE data: {data[:200]}"
                    return res
                if "error" in chunk and not chunk.get("choices"):
                    res.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return res
                text = _delta_text(chunk, cfg.endpoint)
                if text:
                    if res.ttft is None:
                        res.ttft = now
                    res.chunk_times.append(now)
                    parts.append(text)
                if any(c.get("finish_reason") for c in chunk.get("choices") or []):
                    finished = True
                usage = chunk.get("usage")
                if usage and usage.get("completion_tokens") is not None:
                    res.usage_completion_tokens = int(usage["completion_tokens"])
            res.e2e = time.perf_counter() - t0
            res.text = "".join(parts)
            res.saw_done = done
            if not (done or finished):
                res.error = "stream ended without a finish_reason or data: [DONE]"
            elif not parts:
                res.error = "no content in the stream"
            else:
                res.ok = True
    except (httpx.HTTPError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:300]
    return res


# ---------------------------------------------------------------- one concurrency level


async def resolve_model(client: httpx.AsyncClient, model: str | None) -> str:
    """The model name to send: the given one, else the first of /v1/models, else 'default'."""
    if model:
        return model
    try:
        resp = await client.get("/v1/models", timeout=10)
        data = resp.json().get("data") or []
        if resp.status_code == 200 and data:
            return data[0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        pass
    return "default"


async def run_requests(
    client: httpx.AsyncClient,
    cfg: LoadConfig,
    model: str,
    concurrency: int,
    indices: list[int],
    prompts: dict[int, tuple[str, int]],
    on_done=None,
) -> tuple[list[RequestResult], float]:
    """Closed loop: `concurrency` workers take the next index until none is left."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in indices:
        queue.put_nowait(i)
    results: list[RequestResult] = []
    t0 = time.perf_counter()

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            prompt, ptoks = prompts[i]
            r = await stream_one(client, cfg, model, i, prompt, ptoks, t0)
            results.append(r)
            if on_done is not None:
                on_done(len(results))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(indices)))))
    return results, time.perf_counter() - t0


def summarize(results: list[RequestResult], wall_s: float, concurrency: int, counter: TokenCounter) -> dict:
    """Aggregate one level: throughput over the level's wall time, latency percentiles."""
    ok = [r for r in results if r.ok]
    for r in ok:
        r.tokens = counter.count(r.text)
    tokens = sum(r.tokens or 0 for r in ok)
    # usage only counts when every completed request reported a positive count (the seed sends zeros)
    usage = [r.usage_completion_tokens for r in ok if r.usage_completion_tokens]
    usage_total = sum(usage) if ok and len(usage) == len(ok) else None
    ttft = [r.ttft for r in ok if r.ttft is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    # time per output token after the first, by the server's count where it gives one: unlike ITL it
    # does not depend on how the tokens were grouped into chunks
    tpot = []
    for r in ok:
        n = r.usage_completion_tokens or r.tokens
        if n and n > 1 and len(r.chunk_times) > 1 and r.ttft is not None and r.e2e is not None:
            tpot.append((r.e2e - r.ttft) / (n - 1))
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = (r.error or "unknown")[:200]
            errors[key] = errors.get(key, 0) + 1

    def ms(values: list[float], q: float) -> float | None:
        v = percentile(values, q)
        return None if v is None else round(v * 1000, 2)

    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": errors,
        "wall_s": round(wall_s, 3),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "usage_completion_tokens": usage_total,
        "usage_tok_s": round(usage_total / wall_s, 2) if usage_total is not None and wall_s > 0 else None,
        "tokens_per_request_mean": round(tokens / len(ok), 2) if ok else None,
        "req_s": round(len(ok) / wall_s, 3) if wall_s > 0 else None,
        "ttft_ms": {"p50": ms(ttft, 50), "p95": ms(ttft, 95), "mean": _mean_ms(ttft)},
        "itl_ms": {"p50": ms(itl, 50), "p95": ms(itl, 95), "mean": _mean_ms(itl)},
        "tpot_ms": {"p50": ms(tpot, 50), "p95": ms(tpot, 95)},
        "e2e_ms": {"p50": ms(e2e, 50), "p95": ms(e2e, 95), "mean": _mean_ms(e2e)},
        "streams_without_done": sum(1 for r in ok if not r.saw_done),
        "chunks_per_request_mean": round(statistics.mean(len(r.chunk_times) for r in ok), 2) if ok else None,
        "per_request": [_request_row(r) for r in sorted(results, key=lambda r: r.index)],
    }


def _request_row(r: RequestResult) -> dict:
    """The raw numbers of one request, kept in the JSON for later looks (ms)."""

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 2)

    return {
        "index": r.index,
        "start_ms": ms(r.start),
        "ttft_ms": ms(r.ttft),
        "e2e_ms": ms(r.e2e),
        "tokens": r.tokens,
        "usage_tokens": r.usage_completion_tokens,
        "chunks": len(r.chunk_times),
        "prompt_tokens": r.prompt_tokens_sent,
        "error": r.error,
    }


def _mean_ms(values: list[float]) -> float | None:
    return round(statistics.mean(values) * 1000, 2) if values else None


def _client(cfg: LoadConfig, concurrency: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(cfg.timeout_s, connect=30.0)
    return httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), limits=limits, timeout=timeout, headers=headers)


def _prompts(cfg: LoadConfig, counter: TokenCounter, indices: list[int]) -> dict[int, tuple[str, int]]:
    out = {}
    for i in indices:
        p = make_prompt(i, cfg.prompt_len, counter)
        out[i] = (p, counter.count(p))
    return out


def _rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    rss = tree_rss_bytes(pid)
    return None if rss is None else round(rss / 2**20, 1)


async def run_load(cfg: LoadConfig, log=print) -> dict:
    """Warm up, then run every concurrency level in turn; returns the JSON-able report."""
    counter = TokenCounter(cfg.tokenizer)
    max_c = max(cfg.concurrency)
    report: dict[str, Any] = {"config": asdict(cfg), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    report["token_count_method"] = "tokenizer" if counter.exact else "words*1.3 (no --tokenizer given)"
    async with _client(cfg, max_c) as client:
        model = await resolve_model(client, cfg.model)
        report["model"] = model
        next_index = 0
        if cfg.warmup > 0:
            idx = list(range(next_index, next_index + cfg.warmup))
            next_index += cfg.warmup
            t = time.perf_counter()
            res, _ = await run_requests(client, cfg, model, min(cfg.warmup, max_c), idx, _prompts(cfg, counter, idx))
            bad = [r for r in res if not r.ok]
            report["warmup"] = {"requests": len(res), "errors": len(bad), "s": round(time.perf_counter() - t, 2)}
            log(f"  warmup: {len(res)} requests, {len(bad)} errors, {time.perf_counter() - t:.1f}s")
            if bad:
                log(f"  warmup error: {bad[0].error}")
            if res and len(bad) == len(res):
                report["aborted"] = f"every warmup request failed: {bad[0].error}"
                report["levels"] = []
                return report
        report["rss_mib_after_warmup"] = _rss_mib(cfg.pid)
        levels = []
        for c in cfg.concurrency:
            idx = list(range(next_index, next_index + cfg.num_requests))
            next_index += cfg.num_requests
            prompts = _prompts(cfg, counter, idx)
            with ContentionMeter(cfg.pid) as meter:
                results, wall = await run_requests(client, cfg, model, c, idx, prompts)
            level = summarize(results, wall, c, counter)
            level["cpu"] = meter.result
            level["prompt_tokens_mean"] = round(statistics.mean(p[1] for p in prompts.values()), 1)
            level["rss_mib_after"] = _rss_mib(cfg.pid)
            levels.append(level)
            log("  " + one_line(level))
        report["levels"] = levels
    return report


async def run_rss_check(cfg: LoadConfig, total: int = 500, first: int = 50, concurrency: int = 16, log=print) -> dict:
    """Memory target: RSS of the server tree after `first` requests vs after `total`."""
    if cfg.pid is None:
        raise SystemExit("--rss-check needs --pid (the server's process id)")
    counter = TokenCounter(cfg.tokenizer)
    samples: list[dict[str, float]] = []
    async with _client(cfg, concurrency) as client:
        model = await resolve_model(client, cfg.model)
        idx = list(range(total))
        prompts = _prompts(cfg, counter, idx)
        marks = {first, total, *range(100, total, 100)}

        def on_done(n: int) -> None:
            if n in marks:
                samples.append({"requests": n, "rss_mib": _rss_mib(cfg.pid)})
                log(f"  {n} requests done, RSS {samples[-1]['rss_mib']} MiB")

        results, wall = await run_requests(client, cfg, model, concurrency, idx, prompts, on_done=on_done)
    level = summarize(results, wall, concurrency, counter)
    at_first = next((s["rss_mib"] for s in samples if s["requests"] == first), None)
    at_end = next((s["rss_mib"] for s in samples if s["requests"] == total), None)
    growth = (at_end / at_first - 1.0) if at_first and at_end else None
    return {
        "config": asdict(cfg),
        "model": model,
        "rss_check": {
            "requests": total,
            "concurrency": concurrency,
            "samples": samples,
            "rss_mib_after_first": at_first,
            "rss_mib_after_all": at_end,
            "growth": None if growth is None else round(growth, 4),
            "within_10_percent": None if growth is None else growth <= 0.10,
        },
        "levels": [level],
    }


def one_line(level: dict) -> str:
    """A progress line for one level."""
    cpu = level.get("cpu") or {}
    other = f"  other processes {cpu['other_cpu_share']:.0%} CPU" if "other_cpu_share" in cpu else ""
    return (
        f"c={level['concurrency']:>3}  {level['output_tok_s']} tok/s  {level['req_s']} req/s  "
        f"TTFT p50 {level['ttft_ms']['p50']} ms  ITL p50 {level['itl_ms']['p50']} ms  "
        f"e2e p50 {level['e2e_ms']['p50']} ms  errors {level['errors']}{other}"
    )


# ---------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:3000 (no /v1)")
    p.add_argument("--model", default=None, help="model name to send (default: first of /v1/models)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--concurrency", type=_int_list, default=[1, 4, 16, 32], help="e.g. 1,4,16,32")
    p.add_argument("--num-requests", type=int, default=64, help="measured requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (vLLM-style extra field)")
    p.add_argument(
        "--max-tokens-counts-prompt",
        action="store_true",
        help="send max_tokens = prompt tokens + --max-tokens (servers that use it as max_length)",
    )
    p.add_argument("--no-usage", action="store_true", help="do not send stream_options.include_usage")
    p.add_argument("--tokenizer", default=None, help="checkpoint dir whose tokenizer counts output tokens")
    p.add_argument("--prompt-len", type=int, default=32, help="synthetic prompt length in tokens")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the first level")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--extra-body", default="{}", help="JSON object merged into every request body")
    p.add_argument("--api-key", default=None)
    p.add_argument("--pid", type=int, default=None, help="server pid: record RSS of its process tree")
    p.add_argument("--rss-check", action="store_true", help="memory mode: RSS after 50 vs after 500 requests")
    p.add_argument("--rss-requests", type=int, default=500)
    p.add_argument("--rss-first", type=int, default=50)
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--markdown", default=None, help="also write a markdown table here")
    p.add_argument("--plot", default=None, help="also write a PNG plot (throughput, TTFT vs concurrency)")
    p.add_argument("--label", default=None, help="name of this server in the table and plot")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        base_url=a.base_url,
        model=a.model,
        endpoint=a.endpoint,
        concurrency=a.concurrency,
        num_requests=a.num_requests,
        max_tokens=a.max_tokens,
        ignore_eos=a.ignore_eos,
        max_tokens_counts_prompt=a.max_tokens_counts_prompt,
        include_usage=not a.no_usage,
        tokenizer=a.tokenizer,
        prompt_len=a.prompt_len,
        warmup=a.warmup,
        temperature=a.temperature,
        top_p=a.top_p,
        timeout_s=a.timeout,
        pid=a.pid,
        extra_body=json.loads(a.extra_body),
        api_key=a.api_key,
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    cfg = config_from_args(a)
    if a.rss_check:
        c = cfg.concurrency[0] if len(cfg.concurrency) == 1 else 16
        report = asyncio.run(run_rss_check(cfg, a.rss_requests, a.rss_first, c))
        rc = report["rss_check"]
        print(
            f"RSS after {a.rss_first}: {rc['rss_mib_after_first']} MiB, after {a.rss_requests}: "
            f"{rc['rss_mib_after_all']} MiB, growth {rc['growth']}, within 10%: {rc['within_10_percent']}"
        )
    else:
        report = asyncio.run(run_load(cfg))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2))
    label = a.label or report.get("model") or a.base_url
    if a.markdown or a.plot or not a.out:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import report as rep

        peers = [{"peer": label, "status": "ok", "load": report}]
        table = rep.markdown_table(peers)
        print(table)
        if a.markdown:
            Path(a.markdown).write_text(table + "\n")
        if a.plot:
            rep.plot(peers, a.plot)
    return 0 if all(lv["errors"] == 0 for lv in report["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
