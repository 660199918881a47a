"""Reading a test server's /metrics: the engine's gauges and counters, and waiting for it to be idle."""

from __future__ import annotations

import re
import time

import httpx


def metrics(url: str) -> dict[str, float]:
    """The falcon_* samples of /metrics, keyed by name plus the finish_reason label where there is one."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'^(falcon_\w+)\{([^}]*)\} (\S+)$', line)
        if m:
            reason = re.search(r'finish_reason="(\w+)"', m.group(2))
            out[m.group(1) + (f":{reason.group(1)}" if reason else "")] = float(m.group(3))
    return out


def delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def wait_idle(url: str, before: dict[str, float] | None = None, aborts: int = 0,
              timeout: float = 30.0) -> dict[str, float]:
    """/metrics once `aborts` more requests ended by abort than in `before` and the engine is idle
    (gauges are set at the end of each engine step, so they may lag a request just submitted)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = (m.get("falcon_requests_running") == 0 and m.get("falcon_requests_waiting") == 0
                and m.get("falcon_kv_cache_tokens") == 0)
        counted = before is None or delta(before, m, "falcon_requests_finished_total:abort") >= aborts
        if (idle and counted) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)
