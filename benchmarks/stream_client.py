"""A minimal closed-loop streaming client, kept only for the GPU check (gpu_check.py).

The peer comparison uses aiperf (see README.md); the GPU machine has no network and aiperf's
dependencies beyond what it has come to about 50 MB of wheels, so the GPU check loads
`bentoml serve` with this instead, using httpx (present there) and aiperf's metric definitions:
TTFT = send to the first non-empty content; ITL = (e2e - TTFT) / (output tokens - 1) per request;
output tok/s = output tokens of the level / its wall time. Tokens are the server's own count (usage).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx

_TEXT = "the falcon is a bird of prey and the model answers questions large language models predict tokens"
_WORDS = _TEXT.split(" ")


def prompts(tokenizer, count: int, length: int, first: int = 0) -> list[str]:
    """Distinct prompts of about `length` tokens (no two share a prefix beyond a few tokens)."""
    out = []
    for i in range(first, first + count):
        words = [f"Request {i}:"] + [_WORDS[(i * 7 + j * j) % len(_WORDS)] for j in range(length * 2)]
        ids = tokenizer.encode(" ".join(words), add_special_tokens=False)[:length]
        out.append(tokenizer.decode(ids))
    return out


async def _one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 1.0,
            "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start, ttft, tokens = time.perf_counter(), None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"}
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                chunk = json.loads(line[5:])
                if ttft is None and any(c.get("text") for c in chunk.get("choices") or []):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens")
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    if ttft is None or not tokens:
        return {"error": "no content or no usage in the stream"}
    e2e = time.perf_counter() - start
    return {"ttft": ttft, "e2e": e2e, "tokens": tokens, "itl": (e2e - ttft) / (tokens - 1) if tokens > 1 else None}


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return round(1000 * (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)), 2)


async def run_level(
    base_url: str,
    tokenizer,
    concurrency: int,
    requests: int,
    max_tokens: int = 64,
    prompt_len: int = 32,
    warmup: int = 0,
    timeout_s: float = 120.0,
) -> dict:
    """Warm up, then `concurrency` clients send one request after another until `requests` are done."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(timeout_s, connect=30), limits=limits) as c:
        model = ((await c.get("/v1/models")).json().get("data") or [{"id": "default"}])[0]["id"]
        if warmup:
            warm = prompts(tokenizer, warmup, prompt_len, 10**6)
            await asyncio.gather(*(_one(c, model, p, max_tokens) for p in warm))
        queue = list(reversed(prompts(tokenizer, requests, prompt_len)))
        results: list[dict] = []

        async def client() -> None:
            while queue:
                results.append(await _one(c, model, queue.pop(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(min(concurrency, requests))))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "concurrency": concurrency, "requests": len(results), "completed": len(ok), "errors": len(errors),
        "error_samples": sorted(set(errors))[:3], "wall_s": round(wall, 3),
        "usage_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "ttft_ms": {"p50": _pct([r["ttft"] for r in ok], 50), "p95": _pct([r["ttft"] for r in ok], 95)},
        "itl_ms": {"p50": _pct([r["itl"] for r in ok if r["itl"]], 50),
                   "p95": _pct([r["itl"] for r in ok if r["itl"]], 95)},
        "e2e_ms": {"p50": _pct([r["e2e"] for r in ok], 50)},
        "tokens_per_request_mean": round(statistics.mean(r["tokens"] for r in ok), 2) if ok else None,
    }  # fmt: skip
