"""Model-level checks for the GPU check: copy bandwidth and roofline, logits against transformers, and
transformers' own fastest single-stream `generate` (static cache + torch.compile) as the peer.

    python benchmarks/gpu_model_checks.py --checkpoint CKPT_DIR --out model_checks.json

Needs torch, transformers and accelerate, not BentoML. Runs on the CPU too (a dry run of the GPU
check), where the numbers mean nothing but every path is exercised.

Correctness: 32 prompt tokens, then 32 teacher-forced decode steps, at batch 1 and 64, through
the serving path (RunningBatch, FalconRunner, CUDA graphs on a GPU), against transformers'
forward of the whole sequence. Both run in bf16; each is also compared with transformers in
float32, so the report says whether this engine is as close to the exact logits as transformers.
A mixed step too: 64 rows decoding and a new 32-token prompt in one step (through the pieces of its
token bucket on a GPU), against transformers. Speed: the decode step by batch size, where its time
goes, and the mixed step against the pure 64-row decode step. `--only-peer`: transformers' compiled
`generate` alone, in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from falcon_service.engine import varlen_attention
from falcon_service.engine.batch import NewPrompt, RunningBatch, StagedChunk
from falcon_service.engine.cuda_graphs import DecodeGraphs, StepGraphs
from falcon_service.engine.falcon import FalconRunner

PROMPT, STEPS = 32, 32
# bf16 tolerance, stated: the engine's logits stay within 2% (relative L2) of transformers' bf16 logits,
# and no further from the float32 logits than 1.5x transformers' own bf16 distance to them
REL_L2_VS_TRANSFORMERS = 2e-2
RATIO_VS_FLOAT32 = 1.5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float = 2.0, repeats: int = 10) -> dict:
    """Device-to-device copy of a large buffer; bytes read plus bytes written per second (median)."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:
            times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    return {"buffer_gib": gib, "seconds": seconds, "bytes_per_s": 2 * n * 2 / seconds}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def new_prompts(prompts: list[list[int]], first_id: int = 0) -> list[NewPrompt]:
    """Prompts of one choice each, as sequences first_id, first_id + 1, ..."""
    return [NewPrompt((first_id + i,), p) for i, p in enumerate(prompts)]


def engine_logits(model, tokens: torch.Tensor, graphs: bool) -> torch.Tensor:
    """Logits of the serving path: prefill PROMPT tokens, then decode the rest one at a time (teacher-forced).
    Returns (batch, 1 + STEPS, vocab): after the prompt, and after each fed token."""
    batch_size = tokens.shape[0]
    runner = FalconRunner(model, batch_rows=max(batch_size, 1), max_len=model.config.max_position_embeddings)
    decode_graphs = None
    if graphs and runner.device.type == "cuda":
        decode_graphs = DecodeGraphs(runner)  # the buckets this check needs are captured on first use
    batch = RunningBatch(runner, decode_graphs)
    host = tokens.tolist()
    out = [batch.run(False, new_prompts([row[:PROMPT] for row in host])).float()]
    for step in range(STEPS):
        batch.set_tokens(0, tokens[:, PROMPT + step])
        out.append(batch.run(True).float())
    return torch.stack(out, dim=1)


def transformers_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(tokens).logits
    return logits[:, PROMPT - 1 : PROMPT + STEPS].float()


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    return {
        "rel_l2": rel_l2(ours, theirs),
        "max_abs": float((ours - theirs).abs().max()),
        "top1_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
    }


def attention_fast_paths(model) -> dict:
    """Whether each attention call of the runner runs on a fused SDPA kernel (flash, efficient or cuDNN):
    run under `sdpa_kernel` without the math fallback, a call that needs it fails."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    runner = FalconRunner(model, batch_rows=4, max_len=model.config.max_position_embeddings)
    batch = RunningBatch(runner)
    long = list(range(7, 50))
    batch.run(False, chunk=StagedChunk((9,), long, 0, 13))  # the first chunk of a long prompt
    calls = {
        "prefill of new prompts": lambda: batch.run(False, new_prompts([list(range(1, 40)), list(range(5, 30))])),
        "decode": lambda: (batch.set_tokens(0, [1, 2]), batch.run(True)),
        "prefill chunk after a cached prefix": lambda: batch.run(False, chunk=StagedChunk((9,), long, 13, 26)),
    }
    result = {}
    for name, call in calls.items():
        try:
            with sdpa_kernel(fused):
                call()
            result[name] = "fused kernel"
        except RuntimeError as exc:
            result[name] = f"needs the math kernel: {str(exc)[:200]}"
            call()  # keep the batch's state as if it had run
    return result


def decoding_batch(model, batch_rows: int, decoding: int, attention: str = "split", fused_ops: bool = False
                   ) -> tuple[FalconRunner, RunningBatch]:
    """A batch of `batch_rows` rows (CUDA graphs on a GPU: decode steps whole, steps that prefill in pieces)
    with `decoding` rows of 32-token prompts, warmed up by three decode steps, the device idle."""
    runner = FalconRunner(model, batch_rows=batch_rows, max_len=model.config.max_position_embeddings,
                          attention=attention, fused_ops=fused_ops)
    graphs = step_graphs = None
    if runner.device.type == "cuda":
        graphs, step_graphs = DecodeGraphs(runner), StepGraphs(runner, batch_rows + 512)
    batch = RunningBatch(runner, graphs, step_graphs=step_graphs)
    batch.run(False, new_prompts([list(range(1, 33))] * decoding))
    batch.set_tokens(0, [3] * decoding)
    for _ in range(3):
        batch.run(True)
    sync(runner.device)
    return runner, batch


def mixed_step(model, decoding: int = 64, prompt: int = 32, repeats: int = 7, attention: str = "split",
               fused_ops: bool = False) -> dict:
    """A step that decodes `decoding` rows and prefills one `prompt`-token prompt, against a pure decode step of
    the same rows (median wall times; on a GPU the decode step replays its graph, the mixed step the pieces of
    its token bucket with attention between them: `attention`'s kernels)."""
    runner, batch = decoding_batch(model, decoding + 1, decoding, attention, fused_ops)

    def timed(step) -> float:
        times = []
        for i in range(repeats + 1):  # the first captures what the step needs
            sync(runner.device)
            start = time.perf_counter()
            step(i)
            sync(runner.device)
            if i:
                times.append(1000 * (time.perf_counter() - start))
        return statistics.median(times)

    def mixed(i: int) -> None:
        batch.run(True, [NewPrompt((20_000 + i,), list(range(40 + i, 40 + i + prompt)))])
        batch.free([20_000 + i])

    decode_ms, mixed_ms = timed(lambda _: batch.run(True)), timed(mixed)
    return {"decoding": decoding, "prompt": prompt, "attention": attention, "fused_ops": fused_ops,
            "decode_ms": decode_ms, "mixed_ms": mixed_ms, "ratio": mixed_ms / decode_ms}


def mixed_step_logits(model, decoding: int = 64, attention: str = "split", fused_ops: bool = False) -> dict:
    """The logits of a mixed step (every row decoding a teacher-forced token, and a new 32-token prompt) through
    the serving path (graphs on a GPU; `attention`'s kernels), against transformers' forward of each sequence."""
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    rows = torch.randint(0, vocab, (decoding, PROMPT + 4), generator=generator).tolist()
    fresh = torch.randint(0, vocab, (PROMPT,), generator=generator).tolist()
    runner = FalconRunner(model, batch_rows=decoding + 1, max_len=model.config.max_position_embeddings,
                          attention=attention, fused_ops=fused_ops)
    graphs = step_graphs = None
    if runner.device.type == "cuda":
        graphs, step_graphs = DecodeGraphs(runner), StepGraphs(runner, decoding + 1 + 512)
    batch = RunningBatch(runner, graphs, step_graphs=step_graphs)
    batch.run(False, new_prompts([r[:PROMPT] for r in rows]))
    for step in range(3):
        batch.set_tokens(0, [r[PROMPT + step] for r in rows])
        batch.run(True)
    batch.set_tokens(0, [r[PROMPT + 3] for r in rows])
    ours = batch.run(True, [NewPrompt((50_000,), fresh)]).float()
    with torch.inference_mode():
        theirs = torch.cat([model(torch.tensor(rows, device=runner.device)).logits[:, -1],
                            model(torch.tensor([fresh], device=runner.device)).logits[:, -1]]).float()
    return {"decoding": decoding, "attention": attention, "fused_ops": fused_ops, **compare(ours, theirs)}


def decode_step_times(model, batch_sizes: tuple[int, ...] = (1, 64), steps: int = 50, fused_ops: bool = False
                      ) -> dict:
    """Milliseconds per decode step (CUDA graph replay, width bucket 128), the engine's floor per token."""
    times = {}
    for batch_size in batch_sizes:
        runner, batch = decoding_batch(model, batch_size, batch_size, fused_ops=fused_ops)
        start = time.perf_counter()
        for _ in range(steps):
            batch.run(True)
        sync(runner.device)
        times[batch_size] = 1000 * (time.perf_counter() - start) / steps
    return times


def step_profile(model, batch_size: int = 64, steps: int = 20, top: int = 12) -> dict:
    """Where a decode step's time goes.

    - `decode_ms` / `busy_ms`: wall time per graphed decode step, and the device's kernel time in it
      (the difference is time the device waits for the host);
    - `kernels`: the kernels with the most time per step (name, ms per step, calls per step).
    """
    from torch.profiler import ProfilerActivity, profile

    runner, batch = decoding_batch(model, batch_size, batch_size - 1)
    on_cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            batch.run(True)
        sync(runner.device)
        decode_ms = 1000 * (time.perf_counter() - start) / steps
    events = [e for e in prof.key_averages() if (e.device_time_total if on_cuda else e.self_cpu_time_total) > 0]

    def own_us(e) -> float:
        return e.self_device_time_total if on_cuda else e.self_cpu_time_total

    events.sort(key=own_us, reverse=True)
    busy_ms = sum(own_us(e) for e in events) / 1000 / steps
    kernels = [{"name": e.key[:90], "ms_per_step": round(own_us(e) / 1000 / steps, 4),
                "calls_per_step": round(e.count / steps, 1)} for e in events[:top]]
    return {"batch": batch_size, "decode_ms": decode_ms, "busy_ms": busy_ms, "kernels": kernels}


def transformers_generate_peer(model, tokens: torch.Tensor, new_tokens: int, compile_: bool, runs: int = 3) -> dict:
    """transformers' fastest single stream: a static KV cache and (optionally) the forward compiled."""
    from transformers import GenerationConfig

    result: dict = {"compiled": compile_, "new_tokens": new_tokens}
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              cache_implementation="static", pad_token_id=model.config.eos_token_id)
    original = model.forward
    try:
        if compile_:
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        prompt = tokens[:1, :PROMPT]
        start = time.perf_counter()
        for _ in range(2):  # compiling and capturing happen here
            model.generate(prompt, generation_config=config)
        result["warmup_s"] = time.perf_counter() - start
        times = []
        for _ in range(runs):
            sync(prompt.device)
            t = time.perf_counter()
            out = model.generate(prompt, generation_config=config)
            sync(prompt.device)
            times.append(time.perf_counter() - t)
        made = out.shape[1] - PROMPT
        result.update(seconds=statistics.median(times), tokens=made, tok_s=made / statistics.median(times))
    except Exception as exc:  # reported, never hidden: the peer's row says it failed and why
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        model.forward = original
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,64", help="batch sizes of the correctness check")
    p.add_argument("--peer-tokens", type=int, default=64)
    p.add_argument("--no-compile", action="store_true", help="the peer without torch.compile")
    p.add_argument("--skip-float32", action="store_true", help="no float32 reference (it needs 2x the memory)")
    p.add_argument("--skip-fused", action="store_true", help="no measurement of the fused small ops")
    p.add_argument("--skip-peer", action="store_true", help="no transformers peer (the GPU check runs it apart)")
    p.add_argument("--only-peer", action="store_true", help="the transformers peer alone (a process of its own)")
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    device = torch.device(a.device)
    report: dict = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        report["gpu"] = torch.cuda.get_device_name(device)
    out = Path(a.out)

    def save() -> None:
        out.write_text(json.dumps(report, indent=2))

    if a.only_peer:  # inductor crashed the process once (SIGSEGV): alone, it takes nothing else with it
        model = AutoModelForCausalLM.from_pretrained(a.checkpoint, dtype=torch.bfloat16, device_map=str(device)).eval()
        tokens = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
        report["peer"] = transformers_generate_peer(model, tokens.to(device), a.peer_tokens, not a.no_compile)
        save()
        print(json.dumps(report, indent=2))
        return 0
    report["bandwidth"] = copy_bandwidth(device, gib=2.0 if device.type == "cuda" else 0.25)
    save()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.checkpoint, dtype=torch.bfloat16, device_map=str(device)).eval()
    report["load_s"] = time.perf_counter() - start
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    report["weight_bytes"] = weight_bytes
    report["roofline_tok_s"] = report["bandwidth"]["bytes_per_s"] / weight_bytes
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    checks = {}
    stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for batch_size in [int(b) for b in a.batches.split(",")]:
        tokens = torch.randint(0, vocab, (batch_size, PROMPT + STEPS), generator=generator).to(device)
        ours = engine_logits(model, tokens, graphs=True)
        theirs = transformers_logits(model, tokens)
        checks[batch_size] = {"vs_transformers_bf16": compare(ours, theirs)}
        stored[batch_size] = (tokens, ours.cpu(), theirs.cpu())
        print(f"batch {batch_size}: {checks[batch_size]}", flush=True)
    report["correctness"] = checks
    save()
    try:  # each a diagnosis of its own: a failure is reported, the rest runs
        report["mixed_step_logits"] = mixed_step_logits(model, min(64, max(int(b) for b in a.batches.split(","))))
        report["mixed_step_logits"]["within_tolerance"] = (
            report["mixed_step_logits"]["rel_l2"] <= REL_L2_VS_TRANSFORMERS)
    except Exception as exc:
        report["mixed_step_logits"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print(f"mixed step logits: {report['mixed_step_logits']}", flush=True)
    save()
    report["attention"] = attention_fast_paths(model)
    print(f"attention: {report['attention']}", flush=True)
    report["decode_step_ms"] = decode_step_times(model)
    print(f"decode step ms: {report['decode_step_ms']}", flush=True)
    save()
    try:  # a diagnosis: its failure must not take the float32 reference and the peer with it
        report["step_profile"] = step_profile(model)
    except Exception as exc:
        report["step_profile_error"] = f"{type(exc).__name__}: {exc}"
    print(f"step profile: {report.get('step_profile') or report.get('step_profile_error')}", flush=True)
    try:
        report["mixed_step"] = mixed_step(model)
    except Exception as exc:
        report["mixed_step"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    print(f"mixed step: {report['mixed_step']}", flush=True)
    save()
    def diagnoses(*named) -> None:
        """Each (name, check) in turn: its figures or its error in the report, saved as it comes."""
        for name, check in named:
            try:
                report[name] = check()
            except Exception as exc:
                report[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print(f"{name}: {report[name]}", flush=True)
            save()

    if device.type == "cuda" and varlen_attention.available():  # the one-kernel attention, against the split one
        diagnoses(("mixed_step_varlen", lambda: mixed_step(model, attention="varlen")),
                  ("mixed_step_logits_varlen", lambda: mixed_step_logits(model, 64, attention="varlen")))
    # the float32 reference before the peer: on the first GPU run the compiled peer timed out once and
    # crashed (SIGSEGV in inductor) once, and took the correctness figures with it
    if not a.skip_float32:
        model = model.float()
        for batch_size, (tokens, ours, theirs) in stored.items():
            exact = transformers_logits(model, tokens).cpu()
            ours_err, theirs_err = rel_l2(ours, exact), rel_l2(theirs, exact)
            checks[batch_size]["engine_bf16_vs_float32"] = ours_err
            checks[batch_size]["transformers_bf16_vs_float32"] = theirs_err
            checks[batch_size]["ratio"] = ours_err / theirs_err if theirs_err else math.inf
        model = model.to(torch.bfloat16)  # exact: the weights were bf16 values
    for c in checks.values():
        c["within_tolerance"] = (c["vs_transformers_bf16"]["rel_l2"] <= REL_L2_VS_TRANSFORMERS
                                 and c.get("ratio", 1.0) <= RATIO_VS_FLOAT32)
    report["tolerance"] = {"rel_l2_vs_transformers_bf16": REL_L2_VS_TRANSFORMERS,
                           "max_ratio_of_float32_errors": RATIO_VS_FLOAT32}
    save()
    # the small ops fused by torch.compile (FALCON_FUSED_OPS): last, since compiling takes a while and this phase
    # has a time limit; each figure is saved as it comes
    if not a.skip_fused:
        diagnoses(("decode_step_ms_fused", lambda: decode_step_times(model, fused_ops=True)),
                  ("mixed_step_fused", lambda: mixed_step(model, fused_ops=True)),
                  ("mixed_step_logits_fused", lambda: mixed_step_logits(model, 64, fused_ops=True)))
    if not a.skip_peer:
        report["peer"] = transformers_generate_peer(model, stored[min(stored)][0], a.peer_tokens, not a.no_compile)
        print(f"peer: {report['peer']}", flush=True)
        save()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
