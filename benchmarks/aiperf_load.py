"""The load of the peer comparison: NVIDIA's aiperf, one `aiperf profile` run per concurrency level.

aiperf sends the requests and computes every figure (its own metric definitions, see README.md);
this module only builds its command line, reads its export, and adds what aiperf does not measure
here: the CPU share of the server, of aiperf itself and of everything else while a level runs (the
contention meter), and the RSS of the server's process tree after each level.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

# aiperf's scheduler spins on the event loop while every concurrency slot is taken (a whole core at
# 16 streams on this 2-core machine). With a request rate as well as a concurrency it sleeps between
# ticks instead; at a constant 500/s a freed slot waits at most 2 ms for its next request.
PACING_RATE = 500.0


@dataclass
class LoadSpec:
    """What to send to one server; the same for every peer except `extra_inputs` and `model`."""

    url: str
    model: str
    tokenizer: str
    aiperf: str  # path of the `aiperf` executable
    endpoint: str = "chat"
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    num_requests: int = 64
    prompt_len: int = 32
    max_tokens: int = 64
    warmup: int = 8
    extra_inputs: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    max_tokens_counts_prompt: bool = False  # the seed baseline takes max_tokens as max_length
    # JMESPath to the text of a streamed chunk, for a server whose chunks aiperf's chat parser does not
    # read (the seed baseline labels them "chat.completion", not "chat.completion.chunk"): the chat
    # body then goes through aiperf's template endpoint, with the same fields
    response_field: str | None = None
    timeout_s: float = 900.0
    seed: int = 1000  # level i uses seed + i: the same prompts for every peer, new ones per level
    aiperf_args: list[str] = field(default_factory=list)  # passed through (prefix, multi-turn, datasets)
    pid: int | None = None  # the server's root process: RSS and CPU of its tree


def command(spec: LoadSpec, concurrency: int, requests: int, seed: int, out_dir: Path, warmup: int = 0) -> list[str]:
    """The `aiperf profile` command line for one level (with `warmup` unmeasured requests before it)."""
    body = {"temperature": 1.0, "top_p": 1.0, "stream_options": {"include_usage": True}, **spec.extra_inputs}
    if spec.max_tokens_counts_prompt:
        body["max_tokens"] = spec.prompt_len + spec.max_tokens
    if spec.response_field:
        endpoint = ["--config", str(template_config(spec, body, out_dir))]
    else:
        endpoint = ["--model", spec.model, "--url", spec.url, "--endpoint-type", spec.endpoint, "--streaming",
                    "--extra-inputs", json.dumps(body)]  # fmt: skip
    argv = [
        spec.aiperf, "profile", *endpoint,
        "--tokenizer", spec.tokenizer,
        "--concurrency", str(concurrency), "--request-rate", str(PACING_RATE),
        "--arrival-pattern", "constant", "--request-count", str(requests),
        "--isl", str(spec.prompt_len), "--osl", str(spec.max_tokens), "--random-seed", str(seed),
        "--request-timeout-seconds", str(spec.timeout_s),
        "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry",
        "--artifact-dir", str(out_dir), "--export-level", "records",
    ]  # fmt: skip
    if warmup:
        warmup_concurrency = min(warmup, max(spec.concurrency))
        argv += ["--warmup-request-count", str(warmup), "--warmup-concurrency", str(warmup_concurrency)]
    return argv + spec.aiperf_args


def template_config(spec: LoadSpec, body: dict[str, Any], out_dir: Path) -> Path:
    """An aiperf config (JSON is YAML) for the template endpoint: one user message, `body`'s fields.

    Its dataset and phase are placeholders that the command line's flags replace.
    """
    fields = json.dumps({"stream": True, **body})[1:-1]
    template = (
        '{"model": {{ model|tojson }}, "messages": [{"role": "user", "content": {{ text|tojson }}}], '
        + "{% raw %}"
        + fields
        + "{% endraw %}}"
    )
    config = {
        "schemaVersion": "2.0",
        "benchmark": {
            "model": spec.model,
            "endpoint": {"url": spec.url, "type": "template", "path": "/v1/chat/completions", "streaming": True,
                         "template": {"body": template, "response_field": spec.response_field}},
            "dataset": {"type": "synthetic", "prompts": {"isl": spec.prompt_len, "osl": spec.max_tokens}},
            "phases": {"type": "concurrency", "concurrency": 1, "requests": 1},
        },
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "aiperf_config.yaml").write_text(json.dumps(config, indent=2))
    return out_dir / "aiperf_config.yaml"


# ---------------------------------------------------------------- CPU and memory of the machine


def tree_pids(pid: int | None) -> set[int]:
    if pid is None:
        return set()
    with contextlib.suppress(psutil.Error):
        return {pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))}
    return set()


def tree_rss_mib(pid: int | None) -> float | None:
    """RSS of a process and its descendants (bentoml and vLLM run worker processes)."""
    if pid is None:
        return None
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(psutil.Error):  # a worker that exited meanwhile
            total += psutil.Process(p).memory_info().rss
    return round(total / 2**20, 1) if total else None


def _busy() -> tuple[float, float]:
    ct = psutil.cpu_times()
    busy = ct.user + ct.nice + ct.system + getattr(ct, "irq", 0.0) + getattr(ct, "softirq", 0.0)
    return busy, getattr(ct, "steal", 0.0)


class CpuSampler:
    """Samples every process's CPU time (and the server's RSS) once a second in a thread (each sample reads
    every process: about 1% of a core at this rate, taken from the server under test).

    `meter(start, end)` then says, for a window that aiperf reports, what share of all cores went to
    the server's tree, to the load tool's tree (aiperf's processes and this one), and to everything
    else (machine busy time from /proc/stat minus those two), and names the busiest other processes.
    """

    def __init__(self, server_pid: int | None, interval_s: float = 1.0):
        self.server_pid = server_pid
        self.interval_s = interval_s
        self.tool_pid: int | None = None
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        procs: dict[int, tuple[str, float]] = {}
        for p in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                procs[p.pid] = (f"{p.info.get('name') or '?'} (pid {p.pid})", t.user + t.system)
        busy, steal = _busy()
        self.samples.append({
            "t": time.time(), "busy": busy, "steal": steal, "procs": procs,
            "server": tree_pids(self.server_pid), "tool": tree_pids(self.tool_pid) | {os.getpid()},
            "rss_mib": tree_rss_mib(self.server_pid),
        })  # fmt: skip

    def rss_at(self, t: float) -> float | None:
        """The server tree's RSS in the last sample taken by time t."""
        before = [s for s in self.samples if s["t"] <= t]
        return before[-1]["rss_mib"] if before else None

    def meter(self, start: float, end: float) -> dict[str, Any] | None:
        """CPU shares within [start, end] (epoch seconds), from the samples closest inside it."""
        inside = [s for s in self.samples if start - self.interval_s / 2 <= s["t"] <= end + self.interval_s / 2]
        if len(inside) < 2:
            return None
        a, b = inside[0], inside[-1]
        share = (b["t"] - a["t"]) * (psutil.cpu_count() or 1)
        server = tool = 0.0
        others: list[tuple[float, str]] = []
        for pid, (name, cpu1) in b["procs"].items():
            delta = cpu1 - a["procs"].get(pid, (name, 0.0))[1]
            if pid in b["server"] or pid in a["server"]:
                server += delta
            elif pid in b["tool"] or pid in a["tool"]:
                tool += delta
            elif delta > 0:
                others.append((delta, name))
        others.sort(reverse=True)
        return {
            "window_s": round(b["t"] - a["t"], 2),
            "server_cpu_share": round(server / share, 3),
            "client_cpu_share": round(tool / share, 3),
            "other_cpu_share": round(max(0.0, b["busy"] - a["busy"] - server - tool) / share, 3),
            "steal_share": round((b["steal"] - a["steal"]) / share, 3),  # the hypervisor gave our vCPUs away
            "busiest_others": [{"process": c, "cpu_share": round(d / share, 3)} for d, c in others[:3]],
        }


# ---------------------------------------------------------------- one aiperf run


def _stat(metric: dict | None, *keys: str) -> dict[str, float | None]:
    metric = metric or {}
    return {k: None if metric.get(k) is None else round(float(metric[k]), 2) for k in keys}


def _value(export: dict, name: str) -> float | None:
    v = (export.get(name) or {}).get("avg")
    return None if v is None else float(v)


def summarize(export: dict, concurrency: int) -> dict[str, Any]:
    """One level in the shape report.py reads, every figure as aiperf computed it."""
    completed = int(_value(export, "request_count") or 0)
    errors = int(_value(export, "completed_request_count") or completed) - completed
    duration = _value(export, "benchmark_duration")
    usage = _value(export, "total_usage_completion_tokens")
    samples = {}
    for item in export.get("error_summary") or []:
        key = json.dumps(item.get("error_details", item))[:200] if isinstance(item, dict) else str(item)[:200]
        samples[key] = int(item.get("count", 1)) if isinstance(item, dict) else 1
    return {
        "concurrency": concurrency,
        "requests": completed + errors,
        "completed": completed,
        "errors": errors,
        "error_samples": samples,
        "wall_s": None if duration is None else round(duration, 3),
        "output_tok_s": _round(_value(export, "output_token_throughput")),
        # the server's own count (usage.completion_tokens); blank where it reports none or zeros
        "usage_tok_s": round(usage / duration, 2) if usage and duration else None,
        "req_s": _round(_value(export, "request_throughput"), 3),
        "ttft_ms": _stat(export.get("time_to_first_token"), "p50", "p95", "avg"),
        "itl_ms": _stat(export.get("inter_token_latency"), "p50", "p95", "avg"),
        "icl_ms": _stat(export.get("inter_chunk_latency"), "p50", "p95"),
        "e2e_ms": _stat(export.get("request_latency"), "p50", "p95", "avg"),
        "tokens_per_request_mean": _round(_value(export, "output_sequence_length")),
        "prompt_tokens_mean": _round(_value(export, "input_sequence_length")),
        "chunks_per_request_mean": _round(_value(export, "http_req_chunks_received")),
    }


def _epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


def _round(v: float | None, digits: int = 2) -> float | None:
    return None if v is None else round(v, digits)


def run_aiperf(
    spec: LoadSpec,
    sampler: CpuSampler,
    concurrency: int,
    requests: int,
    seed: int,
    out_dir: Path,
    warmup: int = 0,
) -> dict[str, Any]:
    """One `aiperf profile` run; returns the level with its CPU meter and the RSS after it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = command(spec, concurrency, requests, seed, out_dir, warmup)
    log_path = out_dir / "aiperf.out"
    with log_path.open("w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=out_dir)
        sampler.tool_pid = proc.pid
        rc = proc.wait()  # aiperf bounds each request by --request-timeout-seconds
    sampler._sample()
    export_path = out_dir / "profile_export_aiperf.json"
    if rc != 0 or not export_path.exists():
        tail = " / ".join(ln.strip() for ln in log_path.read_text(errors="replace").splitlines()[-4:])
        records = out_dir / "profile_export.jsonl"
        if records.exists():  # aiperf exits 1 when every request failed; its records say why
            with records.open() as f:
                first = json.loads(f.readline() or "{}")
            tail = (first.get("error") or {}).get("message") or tail
        return {
            "concurrency": concurrency,
            "requests": requests,
            "completed": 0,
            "errors": requests,
            "error_samples": {f"aiperf exited {rc}: {tail[-300:]}": requests},
            "aiperf_dir": str(out_dir),
        }
    export = json.loads(export_path.read_text())
    level = summarize(export, concurrency)
    if export.get("start_time") and export.get("end_time"):  # the measured phase, in local time
        level["cpu"] = sampler.meter(_epoch(export["start_time"]), _epoch(export["end_time"]))
    warm_path = out_dir / "phases" / "warmup" / "profile_export_aiperf.json"
    if warm_path.exists():
        warm = json.loads(warm_path.read_text())
        done, ok = int(_value(warm, "completed_request_count") or 0), int(_value(warm, "request_count") or 0)
        end = _epoch(warm["end_time"]) if warm.get("end_time") else None
        level["warmup"] = {"requests": done, "errors": done - ok, "rss_mib_after": end and sampler.rss_at(end)}
    level["rss_mib_after"] = tree_rss_mib(spec.pid)
    level["aiperf_dir"] = str(out_dir)
    return level


# ---------------------------------------------------------------- the sweep and the memory check


def run_load(spec: LoadSpec, out_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every concurrency level in turn, aiperf's warmup before the first; the JSON-able report."""
    report: dict[str, Any] = {"spec": {k: v for k, v in vars(spec).items() if k != "pid"},
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "levels": []}  # fmt: skip
    with CpuSampler(spec.pid) as sampler:
        for i, c in enumerate(spec.concurrency):
            warmup = spec.warmup if i == 0 else 0
            level = run_aiperf(spec, sampler, c, spec.num_requests, spec.seed + i, out_dir / f"c{c}", warmup)
            if i == 0:
                report["warmup"] = level.pop("warmup", None)
                report["rss_mib_after_warmup"] = (report["warmup"] or {}).get("rss_mib_after")
                if level["completed"] == 0:
                    report["aborted"] = "every request failed: " + next(iter(level["error_samples"]), "?")
                    report["levels"].append(level)
                    log(f"  c={c}: {report['aborted']}")
                    return report
            report["levels"].append(level)
            log("  " + one_line(level))
    return report


def run_rss_check(
    spec: LoadSpec, out_dir: Path, total: int = 500, first: int = 50, concurrency: int = 16, log=print
) -> dict[str, Any]:
    """Memory target: RSS of the server tree after `first` requests and after `total` (two aiperf runs)."""
    samples = []
    with CpuSampler(spec.pid) as sampler:
        for n, seed in ((first, spec.seed + 100), (total - first, spec.seed + 101)):
            level = run_aiperf(spec, sampler, concurrency, n, seed, out_dir / f"rss_{n}")
            done = n if not samples else samples[-1]["requests"] + n
            samples.append({"requests": done, "rss_mib": level.get("rss_mib_after"), "errors": level["errors"]})
            log(f"  {done} requests done, RSS {samples[-1]['rss_mib']} MiB, errors {level['errors']}")
    at_first, at_end = samples[0]["rss_mib"], samples[-1]["rss_mib"]
    growth = (at_end / at_first - 1.0) if at_first and at_end else None
    return {
        "requests": total,
        "concurrency": concurrency,
        "samples": samples,
        "rss_mib_after_first": at_first,
        "rss_mib_after_all": at_end,
        "growth": None if growth is None else round(growth, 4),
        "within_10_percent": None if growth is None else growth <= 0.10,
    }


def one_line(level: dict) -> str:
    """A progress line for one level."""
    if not level.get("completed"):
        return f"c={level['concurrency']:>3}  every request failed: {next(iter(level['error_samples']), '?')}"
    cpu = level.get("cpu") or {}
    shares = (f"  CPU: aiperf {cpu['client_cpu_share']:.0%}, other processes {cpu['other_cpu_share']:.0%}"
              if cpu else "")  # fmt: skip
    return (
        f"c={level['concurrency']:>3}  {level['output_tok_s']} tok/s  {level['req_s']} req/s  "
        f"TTFT p50 {level['ttft_ms']['p50']} ms  ITL p50 {level['itl_ms']['p50']} ms  "
        f"e2e p50 {level['e2e_ms']['p50']} ms  errors {level['errors']}{shares}"
    )
