"""The GPU check, one command: run by `scripts/gpu_check.sh` on a GPU machine as it comes.

Phases, each in its own process with its own time limit (a phase that fails or runs out of time
is reported and the next one runs):

1. the engine's tests on CUDA (`FALCON_TEST_DEVICE=cuda pytest tests/engine`);
2. the `7b` preset (Falcon-7B's exact shape, random bf16 weights) built on the GPU into a fresh
   BentoML home, timed;
3. model checks (`gpu_model_checks.py`): copy bandwidth and the roofline (bandwidth / weight
   bytes), logits against transformers at batch 1 and 64 and in a mixed step (float32 distance too),
   the decode step by batch size, the mixed step (64 decode rows + a 32-token prompt) against the
   pure 64-row decode step;
4. transformers' compiled `generate` (the single-stream peer), in a process of its own (inductor
   crashed once: it takes nothing else with it);
5. the service under load: `bentoml serve` (or, where BentoML cannot be imported, the engine in
   process: the report says which) at 1, 16, 64 and 256 concurrent streams of 64 output tokens from
   prompts of about 32 tokens, `ignore_eos`, with the GPU's busy share sampled (NVML) during each.

Writes `gpu_check.md` (the table), `gpu_check.json` and logs to `--out` (default `$OUT`).
Also runs on a CPU with `--preset tiny` as a dry run of every path (numbers meaningless there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# the targets
TARGET_ROOFLINE_SHARE = 0.80
TARGET_TOK_S_64 = 6000.0
TARGET_TTFT_P50_64_MS = 150.0
TARGET_ITL_VS_STEP_64 = 1.3  # ITL p50 at 64 streams against the graphed 64-row decode step
TARGET_TOK_S_256 = 12000.0
TARGET_TTFT_P50_256_MS = 500.0
TARGET_MIXED_VS_DECODE = 1.3
TARGET_BUSY_64 = 0.90


class BusySampler:
    """The GPU's busy share while a load runs: NVML's utilization (the share of time a kernel ran), sampled
    every 100 ms on a thread; None where NVML is missing."""

    def __init__(self) -> None:
        import threading

        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:
            self._nvml = None

    def __enter__(self) -> BusySampler:
        import threading

        if self._nvml is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def share(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


class Check:
    """The results so far, written after every phase so that a run cut short still reports."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.data: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "phases": {}}
        self.log = (out / "gpu_check.log").open("a")

    def note(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"[{stamp}] {line}", flush=True)
        self.log.write(f"[{stamp}] {line}\n")
        self.log.flush()

    def phase(self, name: str, **values) -> None:
        self.data["phases"].setdefault(name, {}).update(values)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None, log_name: str | None = None
            ) -> subprocess.CompletedProcess | None:
        """Run a phase's command with a time limit; its output goes to a log file (and the tail to ours)."""
        self.note(f"{name}: {' '.join(cmd)} (limit {timeout:.0f} s)")
        log_path = self.out / (log_name or "gpu_check.log")
        start = time.perf_counter()
        with log_path.open("a") as log:
            log.write(f"\n===== {name}: {' '.join(cmd)}\n")
            log.flush()
            try:
                done = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            except subprocess.TimeoutExpired:
                self.phase(name, status="timeout", seconds=round(time.perf_counter() - start, 1))
                self.note(f"{name}: timed out after {timeout:.0f} s")
                return None
        seconds = round(time.perf_counter() - start, 1)
        self.phase(name, status="ok" if done.returncode == 0 else f"exit {done.returncode}", seconds=seconds)
        self.note(f"{name}: exit {done.returncode} in {seconds} s")
        return done


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def phase_tests(check: Check, env: dict, device: str, timeout: float) -> None:
    test_env = {**env, "FALCON_TEST_DEVICE": device}
    done = check.run("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/engine"],
                     timeout, test_env, log_name="tests.log")
    summary = tail(check.out / "tests.log", 3)
    check.phase("tests", device=device, summary=summary.splitlines()[-1] if summary else "")
    if done is not None and done.returncode != 0:
        check.note("tests failed:\n" + tail(check.out / "tests.log", 40))


def phase_build(check: Check, env: dict, preset: str, device: str, timeout: float) -> str | None:
    done = check.run("build", [sys.executable, "import_model.py", "--preset", preset, "--device", device], timeout, env)
    if done is None or done.returncode != 0:
        return None
    from import_model import get_model, random_model_name

    model = get_model(f"{random_model_name(preset)}:latest", bentoml_home=env["BENTOML_HOME"])
    check.phase("build", tag=str(model.tag), path=model.path, bytes=model.info.metadata.get("total_bytes"))
    return model.path


def phase_model(check: Check, env: dict, path: str, device: str, timeout: float) -> dict:
    out = check.out / "model_checks.json"
    cmd = [sys.executable, "benchmarks/gpu_model_checks.py", "--checkpoint", path, "--out", str(out),
           "--device", device, "--skip-peer"]
    check.run("model", cmd, timeout, env)
    result = json.loads(out.read_text()) if out.is_file() else {}
    check.phase("model", **result)
    return result


def phase_peer(check: Check, env: dict, path: str, device: str, timeout: float, compile_peer: bool) -> None:
    out = check.out / "peer.json"
    cmd = [sys.executable, "benchmarks/gpu_model_checks.py", "--checkpoint", path, "--out", str(out),
           "--device", device, "--only-peer"]
    if not compile_peer:
        cmd.append("--no-compile")
    check.run("peer", cmd, timeout, env)
    result = json.loads(out.read_text()) if out.is_file() else {}
    check.phase("peer", **(result.get("peer") or {}))


async def _in_process_load(path: str, levels: list[tuple[int, int]], max_tokens: int, prompt_len: int) -> dict:
    """The engine without HTTP (when BentoML is not importable): the same load, measured the same way."""
    import statistics

    import torch

    from falcon_service.engine.engine import Engine, GenerationRequest, SamplingParams
    from falcon_service.engine.kv_cache import default_kv_budget
    from falcon_service.engine.loader import load_model
    from falcon_service.engine.scheduler import BatchLimits

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model(path, device, torch.bfloat16 if device == "cuda" else torch.float32)
    budget = default_kv_budget(model.config, model.dtype, model.device, 0.5, 64, 2048)
    engine = Engine(model, tokenizer, BatchLimits(64, budget, 512, 1024))
    engine.capture_graphs()
    results = {}
    try:
        for concurrency, requests in levels:
            counter = iter(range(requests))
            ttfts: list[float] = []
            tokens = 0

            async def client(counter=counter, ttfts=ttfts) -> int:
                made = 0
                for i in counter:
                    ids = tokenizer.encode(f"Request {i}: the falcon is a bird of prey " * 8)[:prompt_len]
                    start = time.perf_counter()
                    stream = engine.submit(GenerationRequest(tuple(ids), SamplingParams(
                        max_tokens=max_tokens, temperature=1.0, ignore_eos=True)))
                    first = True
                    async for event in stream:
                        if first and event.token_ids:
                            ttfts.append(time.perf_counter() - start)
                            first = False
                        made += len(event.token_ids)
                return made

            start = time.perf_counter()
            tokens = sum(await asyncio.gather(*(client() for _ in range(concurrency))))
            wall = time.perf_counter() - start
            ttfts.sort()
            results[concurrency] = {
                "concurrency": concurrency, "requests": requests, "usage_tok_s": tokens / wall,
                "ttft_ms": {"p50": 1000 * statistics.median(ttfts),
                            "p95": 1000 * ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]},
                "errors": 0,
            }
    finally:
        engine.shutdown()
    return results


def phase_serve(check: Check, env: dict, tag: str, path: str, levels: list[tuple[int, int]], timeout: float,
                settings: dict[str, str] | None = None) -> None:
    """`bentoml serve` and the streaming load, or the engine in process if BentoML cannot be imported."""
    import stream_client

    start = time.perf_counter()
    try:
        import bentoml  # noqa: F401
    except ImportError as exc:
        check.note(f"serve: BentoML cannot be imported ({exc}); measuring the engine in process instead")
        check.phase("serve", via="engine in process (no BentoML)", error=str(exc))
        result = asyncio.run(_in_process_load(path, levels, 64, 32))
        check.phase("serve", levels=result, status="ok", seconds=round(time.perf_counter() - start, 1))
        return
    port = free_port()
    # the batch size: the GPU's default; `settings`: FALCON_* of the run (--serve-env), in the report
    serve_env = {**env, "FALCON_MODEL": tag, "FALCON_LOG_LEVEL": "INFO", **(settings or {})}
    log = (check.out / "serve.log").open("a")
    cmd = [sys.executable, "-m", "bentoml", "serve", "service:FalconService", "--port", str(port)]
    check.note(f"serve: {' '.join(cmd)}")
    server = subprocess.Popen(cmd, cwd=REPO, env=serve_env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    check.phase("serve", via="bentoml serve", port=port, settings=settings or {})
    try:
        import httpx

        deadline = start + timeout
        ready = False
        while time.perf_counter() < deadline and server.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    ready = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        check.phase("serve", ready_s=round(time.perf_counter() - start, 1), ready=ready)
        if not ready:
            check.note("serve: not ready:\n" + tail(check.out / "serve.log", 40))
            check.phase("serve", status="not ready")
            return
        check.note(f"serve: ready after {time.perf_counter() - start:.1f} s")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
        results = {}
        for i, (concurrency, requests) in enumerate(levels):
            with BusySampler() as busy:
                level = asyncio.run(stream_client.run_level(f"http://127.0.0.1:{port}", tokenizer, concurrency,
                                                            requests, warmup=4 if i == 0 else 0))
            level["gpu_busy_share"] = busy.share
            check.note(f"serve: {concurrency} streams: {level['usage_tok_s']} tok/s, TTFT p50 "
                       f"{level['ttft_ms']['p50']} ms, ITL p50 {level['itl_ms']['p50']} ms, errors {level['errors']}, "
                       f"GPU busy {busy.share}")
            results[concurrency] = level
            check.phase("serve", levels=results)
        check.phase("serve", status="ok", seconds=round(time.perf_counter() - start, 1))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def fmt(value, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{unit}"


def percent(share: float | None) -> float | None:
    return None if share is None else 100 * share


def report(check: Check) -> str:
    """The markdown table of the figures against the issue's targets."""
    phases = check.data["phases"]
    model = phases.get("model", {})
    serve = phases.get("serve", {})
    levels = {int(k): v for k, v in (serve.get("levels") or {}).items()}
    bandwidth = (model.get("bandwidth") or {}).get("bytes_per_s")
    roofline = model.get("roofline_tok_s")
    peer = phases.get("peer") or model.get("peer") or {}
    one = levels.get(1, {}).get("usage_tok_s")
    many = levels.get(64, {})
    lines = [
        f"# GPU check, {check.data['started']}",
        "",
        f"Device: {model.get('gpu') or model.get('device', '?')}, torch {model.get('torch', '?')}. "
        f"Service measured through {serve.get('via', '?')}"
        f"{' with ' + ', '.join(f'{k}={v}' for k, v in serve['settings'].items()) if serve.get('settings') else ''}.",
        "",
        "| phase | status | seconds |",
        "|---|---|---:|",
    ]
    for name, values in phases.items():
        lines.append(f"| {name} | {values.get('status', '?')} | {fmt(values.get('seconds'), 1)} |")
    lines += [
        "",
        f"Engine tests on the device: {phases.get('tests', {}).get('summary', '?')}",
        f"{check.data.get('preset', '7b')} preset built in {fmt(phases.get('build', {}).get('seconds'), 1, ' s')}; "
        f"weights {fmt((model.get('weight_bytes') or 0) / 1e9, 2, ' GB')}; "
        f"copy bandwidth {fmt((bandwidth or 0) / 1e12, 2, ' TB/s')} (read + written); "
        f"roofline {fmt(roofline, 1, ' tok/s')} for one stream.",
        "",
        f"Decode step (CUDA graph, width 128): {model.get('decode_step_ms')} ms by batch size; with the small ops "
        f"fused (FALCON_FUSED_OPS): {model.get('decode_step_ms_fused')}. "
        f"Attention kernels: {model.get('attention')}.",
        "",
    ]
    prof = model.get("step_profile")
    if model.get("step_profile_error"):
        lines += [f"Step profile failed: {model['step_profile_error'][:200]}", ""]
    if prof:
        lines += [
            f"Step profile at batch {prof['batch']}: graphed decode step {fmt(prof['decode_ms'], 2, ' ms')} wall, "
            f"{fmt(prof['busy_ms'], 2, ' ms')} of kernels in it.",
            "",
            "| kernel | ms per step | calls per step |",
            "|---|---:|---:|",
            *[f"| `{k['name']}` | {k['ms_per_step']} | {k['calls_per_step']} |" for k in prof["kernels"]],
            "",
        ]
    lines += [
        "| figure | this service | peer / bound | target | met |",
        "|---|---:|---:|---|---|",
    ]
    if one is not None and roofline:
        share = one / roofline
        lines.append(f"| 1 stream, output tok/s | {fmt(one, 1)} | roofline {fmt(roofline, 1)} "
                     f"({share:.0%}) | >= 80% of roofline | {'yes' if share >= TARGET_ROOFLINE_SHARE else 'no'} |")
    if one is not None and peer.get("tok_s"):
        compiled = "compiled" if peer.get("compiled") else "not compiled"
        lines.append(f"| 1 stream vs transformers `generate` (static cache, {compiled}) | {fmt(one, 1)} | "
                     f"{fmt(peer['tok_s'], 1)} | >= peer | {'yes' if one >= peer['tok_s'] else 'no'} |")
    elif peer.get("error"):
        lines.append(f"| transformers `generate` peer | | failed: {peer['error'][:120]} | | |")
    step_64 = (model.get("decode_step_ms") or {}).get("64")
    if many:
        tok_s, ttft = many.get("usage_tok_s"), (many.get("ttft_ms") or {}).get("p50")
        itl, busy = (many.get("itl_ms") or {}).get("p50"), many.get("gpu_busy_share")
        lines.append(f"| 64 streams, output tok/s | {fmt(tok_s, 0)} | | >= 6,000 | "
                     f"{'yes' if tok_s and tok_s >= TARGET_TOK_S_64 else 'no'} |")
        lines.append(f"| 64 streams, TTFT p50 | {fmt(ttft, 1, ' ms')} | | <= 150 ms | "
                     f"{'yes' if ttft is not None and ttft <= TARGET_TTFT_P50_64_MS else 'no'} |")
        if itl is not None and step_64:
            lines.append(f"| 64 streams, ITL p50 vs the graphed 64-row step | {fmt(itl, 2, ' ms')} | "
                         f"{fmt(step_64, 2, ' ms')} ({itl / step_64:.2f}x) | <= 1.3x | "
                         f"{'yes' if itl <= TARGET_ITL_VS_STEP_64 * step_64 else 'no'} |")
        lines.append(f"| GPU busy during the 64-stream run (NVML) | {fmt(percent(busy), 0, '%')} | | >= 90% | "
                     f"{'yes' if busy is not None and busy >= TARGET_BUSY_64 else 'no'} |")
    most = levels.get(256, {})
    if most:
        tok_s, ttft = most.get("usage_tok_s"), (most.get("ttft_ms") or {}).get("p50")
        ok = tok_s and tok_s >= TARGET_TOK_S_256 and ttft is not None and ttft <= TARGET_TTFT_P50_256_MS
        lines.append(f"| 256 streams, output tok/s / TTFT p50 / errors | {fmt(tok_s, 0)} / {fmt(ttft, 1, ' ms')} / "
                     f"{most.get('errors', '?')} | GPU busy {fmt(percent(most.get('gpu_busy_share')), 0, '%')} | "
                     f">= 12,000 / <= 500 ms / 0 | {'yes' if ok and not most.get('errors') else 'no'} |")
    for key, logits_key, name in (
            ("mixed_step", "mixed_step_logits", "split attention"),
            ("mixed_step_varlen", "mixed_step_logits_varlen", "one Triton attention kernel, FALCON_ATTENTION=varlen"),
            ("mixed_step_fused", "mixed_step_logits_fused", "split attention, small ops fused, FALCON_FUSED_OPS")):
        mixed, logits = model.get(key) or {}, model.get(logits_key) or {}
        if mixed.get("ratio") is not None:
            met = "yes" if mixed["ratio"] <= TARGET_MIXED_VS_DECODE else "no"
            lines.append(f"| mixed step ({mixed['decoding']} decode rows + a {mixed['prompt']}-token prompt; {name}) "
                         f"vs the pure decode step | {fmt(mixed['mixed_ms'], 2, ' ms')} | "
                         f"{fmt(mixed['decode_ms'], 2, ' ms')} ({mixed['ratio']:.2f}x); logits rel. L2 "
                         f"{fmt(logits.get('rel_l2'), 4)} | <= 1.3x | {met} |")
        elif mixed.get("error"):
            lines.append(f"| mixed step ({name}) | failed: {mixed['error'][:120]} | | <= 1.3x | no |")
    eager_steps, fused_steps = model.get("decode_step_ms") or {}, model.get("decode_step_ms_fused") or {}
    for rows in ("1", "64"):
        if rows in eager_steps and rows in fused_steps:
            lines.append(f"| decode step of {rows} row(s), small ops fused (FALCON_FUSED_OPS) | "
                         f"{fmt(fused_steps[rows], 3, ' ms')} | eager ops {fmt(eager_steps[rows], 3, ' ms')} "
                         f"({fused_steps[rows] / eager_steps[rows]:.2f}x) | < 1x pays | "
                         f"{'yes' if fused_steps[rows] < eager_steps[rows] else 'no'} |")
    if fused_steps.get("error"):
        lines.append(f"| decode step, small ops fused | failed: {fused_steps['error'][:120]} | | < 1x pays | no |")
    mixed_logits = model.get("mixed_step_logits") or {}
    if mixed_logits.get("rel_l2") is not None:
        lines.append(f"| logits of a mixed step ({mixed_logits['decoding']} decode rows + a prompt), rel. L2 vs "
                     f"transformers bf16 | {fmt(mixed_logits['rel_l2'], 4)} | | <= 0.02 | "
                     f"{'yes' if mixed_logits.get('within_tolerance') else 'no'} |")
    for batch, c in sorted((model.get("correctness") or {}).items(), key=lambda kv: int(kv[0])):
        vs = c.get("vs_transformers_bf16", {})
        lines.append(
            f"| logits at batch {batch} (prefill + 32 decode steps), rel. L2 vs transformers bf16 | "
            f"{fmt(vs.get('rel_l2'), 4)} | float32 error: ours {fmt(c.get('engine_bf16_vs_float32'), 4)}, "
            f"transformers {fmt(c.get('transformers_bf16_vs_float32'), 4)} | <= 0.02, ours <= 1.5x theirs | "
            f"{'yes' if c.get('within_tolerance') else 'no'} |")
    lines += ["", "ITL = (e2e - TTFT) / (output tokens - 1) per request (aiperf's inter_token_latency; vLLM calls "
              "it TPOT); tokens are the server's usage count.", "",
              "| streams | output tok/s | TTFT p50 | TTFT p95 | ITL p50 | errors | GPU busy |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for concurrency, level in sorted(levels.items()):
        itl = level.get("itl_ms") or level.get("tpot_ms") or {}
        lines.append(f"| {concurrency} | {fmt(level.get('usage_tok_s'), 1)} | "
                     f"{fmt((level.get('ttft_ms') or {}).get('p50'), 1, ' ms')} | "
                     f"{fmt((level.get('ttft_ms') or {}).get('p95'), 1, ' ms')} | "
                     f"{fmt(itl.get('p50'), 2, ' ms')} | {level.get('errors', '?')} | "
                     f"{fmt(percent(level.get('gpu_busy_share')), 0, '%')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_check_out"))
    p.add_argument("--preset", default="7b")
    p.add_argument("--device", default=None, help="default: cuda when present")
    p.add_argument("--skip", default="", help="comma-separated phases to skip: tests,build,model,peer,serve")
    p.add_argument("--levels", default="1:8,16:64,64:256,256:512", help="streams:requests per load level")
    p.add_argument("--no-compile", action="store_true", help="the transformers peer without torch.compile")
    p.add_argument("--serve-env", action="append", default=[], metavar="FALCON_X=VALUE",
                   help="a setting of the served engine (repeatable), e.g. FALCON_ENGINE_PROCESS=true")
    p.add_argument("--limits", default="tests:80,build:70,model:140,peer:90,serve:190",
                   help="seconds per phase (the default fits one 600-second call of the device tool)")
    a = p.parse_args(argv)
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out)
    check.data["preset"] = a.preset
    skip = set(filter(None, a.skip.split(",")))
    limits = {k: float(v) for k, v in (item.split(":") for item in a.limits.split(","))}
    levels = [(int(c), int(n)) for c, n in (item.split(":") for item in a.levels.split(","))]
    home = Path(os.environ.get("GPU_CHECK_HOME", "/tmp/falcon-gpu-check"))
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "BENTOML_HOME": str(home / "bentoml"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    check.phase("environment", device=device, torch=torch.__version__, python=sys.version.split()[0],
                gpu=torch.cuda.get_device_name() if device == "cuda" else None, status="ok")
    try:
        if "tests" not in skip:
            phase_tests(check, env, device, limits["tests"])
        path = None
        if "build" not in skip:
            path = phase_build(check, env, a.preset, device, limits["build"])
        if path and "model" not in skip:
            phase_model(check, env, path, device, limits["model"])
        if path and "peer" not in skip:
            phase_peer(check, env, path, device, limits["peer"], not a.no_compile)
        if path and "serve" not in skip:
            tag = check.data["phases"]["build"]["tag"]
            settings = dict(item.split("=", 1) for item in a.serve_env)
            phase_serve(check, env, tag, path, levels, limits["serve"], settings)
    finally:
        table = report(check)
        (out / "gpu_check.md").write_text(table)
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
