"""Structured outputs under load: what a JSON schema costs the requests that use it and the others.

One server (ours, the `small` preset on the CPU, float32) and aiperf at 16 streaming clients, in runs
that alternate:

- mixed: every other request carries `response_format` with a JSON schema of 10 fields (bounded, so
  a reply ends on its own), the others are plain chat requests (`ignore_eos`, a fixed output length);
- plain: requests of the same shape, all plain: each constrained one replaced by a plain stand-in of
  the length that the constrained reply had in the mixed run (`usage`), so that both runs have the
  same shape (when requests end and new ones are prefilled) and differ only by the grammar.

Every run draws its own prompts (of the same length): a run on prompts that an earlier run left in the
prefix cache prefills less and looks faster. A warm-up run of its own prompts comes first. Rounds
alternate the order of their two runs (mixed first, then plain first), so that a drift in the machine's
speed favours neither. (A first version reused the mixed run's prompts in the plain run, which always
ran second: it measured a 10-18% "loss" of the plain half that was the prefix cache and the order.)

Each request's figures come from aiperf's per-request records (`profile_export.jsonl`), grouped by
prompt (`inputs.json`). Reported per run: each group's ITL (aiperf's per-request (e2e - TTFT) /
(tokens - 1), what vLLM calls TPOT), TTFT, tokens, and the group's output tokens over the run's
duration; and, over all runs, the two figures of issue 11: constrained ITL / plain ITL within the
mixed runs, and the plain half's token rate (1 / ITL) in the mixed runs against the same requests'
in the plain runs.

    .venv/bin/python benchmarks/structured.py --out-dir benchmarks/.runs/structured
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import compare  # noqa: E402  (the peers' launcher and the aiperf venv)

SCHEMA: dict[str, Any] = {  # 10 fields, every string and array bounded: a reply fits in MAX_CONSTRAINED
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "maxLength": 16},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "city": {"type": "string", "maxLength": 12},
        "country": {"enum": ["FR", "DE", "US", "JP", "BR"]},
        "level": {"type": "integer", "minimum": 1, "maximum": 10},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "active", "role", "tags", "city", "country", "level", "verified"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}
MAX_CONSTRAINED = 256
PROMPT = ("describe a user of our service with a name an age an email address a role a few tags a city a "
          "country a level and whether the account is active and verified answer in json please")


def dataset(n: int, plain_tokens: int, seed: int, lengths: list[int] | None = None) -> list[dict[str, Any]]:
    """aiperf single_turn entries, prompts of about 32 words drawn with `seed`. Without `lengths` (a mixed run)
    the odd entries are constrained; with them (a plain run) the odd entries are plain requests of these
    lengths (those the constrained replies of the mixed run had, in order), so both runs have the same
    shape and differ only by the grammar. Every run gets its own seed: a run on prompts that an earlier
    run left in the prefix cache would prefill less, and look faster for it."""
    rng = random.Random(seed)
    words = PROMPT.split()
    entries = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(32))
        if i % 2 and lengths is None:
            entries.append({"text": text, "output_length": MAX_CONSTRAINED,
                            "extra": {"response_format": RESPONSE_FORMAT}})  # fmt: skip
        else:
            length = plain_tokens if not i % 2 else lengths[i // 2]  # type: ignore[index]
            entries.append({"text": text, "output_length": length, "extra": {"ignore_eos": True}})
    return entries


def completion_tokens(out: Path) -> dict[str, int]:
    """Each request's output length as the server counted it (`usage`), by its prompt text."""
    texts = {s["session_id"]: s["payloads"][0]["messages"][-1]["content"]
             for s in json.loads((out / "inputs.json").read_text())["data"]}  # fmt: skip
    lengths = {}
    with (out / "profile_export.jsonl").open() as f:
        for line in f:
            record = json.loads(line)
            tokens = _metric(record, "usage_completion_tokens")
            if tokens:
                lengths[texts[record["metadata"]["conversation_id"]]] = int(tokens)
    return lengths


def aiperf_argv(aiperf: Path, url: str, tokenizer: Path, data: Path, concurrency: int, count: int, out: Path
                ) -> list[str]:  # fmt: skip
    argv = [
        str(aiperf), "profile", "--model", compare.SERVED_NAME, "--url", url, "--endpoint-type", "chat",
        "--streaming", "--extra-inputs", json.dumps({"temperature": 1.0, "stream_options": {"include_usage": True}}),
        "--tokenizer", str(tokenizer), "--input-file", str(data), "--custom-dataset-type", "single_turn",
        "--dataset-sampling-strategy", "sequential",
        "--concurrency", str(concurrency), "--request-rate", "500", "--arrival-pattern", "constant",
        "--request-count", str(count), "--random-seed", "1",
        "--ui", "none", "--no-server-metrics", "--no-gpu-telemetry",
        "--artifact-dir", str(out), "--export-level", "records",
    ]  # fmt: skip
    return argv


def _metric(record: dict, name: str) -> float | None:
    item = record["metrics"].get(name)
    return None if item is None else item["value"]


def groups(out: Path, odd_texts: set[str], odd_label: str) -> dict[str, Any]:
    """The run's measured requests in two groups: the even entries ("plain") and the odd ones
    (`odd_label`: "constrained" in a mixed run, "stand-in" in a plain run), told apart by their prompt."""
    odd = {s["session_id"]: s["payloads"][0]["messages"][-1]["content"] in odd_texts
           for s in json.loads((out / "inputs.json").read_text())["data"]}  # fmt: skip
    export = json.loads((out / "profile_export_aiperf.json").read_text())
    duration_s = export["benchmark_duration"]["avg"]  # seconds
    split: dict[str, list[dict]] = {odd_label: [], "plain": []}
    errors = 0
    with (out / "profile_export.jsonl").open() as f:
        for line in f:
            record = json.loads(line)
            meta = record["metadata"]
            if meta.get("benchmark_phase") != "profiling":
                continue
            if record.get("error"):
                errors += 1
                continue
            split[odd_label if odd[meta["conversation_id"]] else "plain"].append(record)
    result: dict[str, Any] = {"duration_s": round(duration_s, 3), "errors": errors,
                              "output_tok_s": round(export["output_token_throughput"]["avg"], 2)}  # fmt: skip
    for name, records in split.items():
        if not records:
            continue
        itl = [v for r in records if (v := _metric(r, "inter_token_latency")) is not None]
        tokens = [_metric(r, "output_sequence_length") or 0 for r in records]
        result[name] = {
            "requests": len(records),
            "itl_ms_mean": round(statistics.fmean(itl), 2),
            "itl_ms_p50": round(statistics.median(itl), 2),
            "ttft_ms_p50": round(statistics.median(_metric(r, "time_to_first_token") for r in records), 1),
            "tokens_mean": round(statistics.fmean(tokens), 1),
            "output_tok_s": round(sum(tokens) / duration_s, 2),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=HERE / ".runs" / time.strftime("structured-%Y%m%d-%H%M%S"))
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=64, help="per run (half constrained in a mixed run)")
    p.add_argument("--plain-tokens", type=int, default=128, help="output tokens of a plain request")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs (mixed, plain)")
    p.add_argument("--preset", default="small")
    p.add_argument("--ours-env", action="append", default=[], metavar="KEY=VALUE",
                   help="engine settings for the server (repeatable), e.g. FALCON_PREFIX_CACHING=false")
    a = p.parse_args(argv)
    out = a.out_dir.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    args = compare.parse_args(["--peers", "ours", "--skip-install", "--out-dir", str(out),
                               *(f"--ours-env={kv}" for kv in a.ours_env)])
    checkpoint = compare.ensure_checkpoint(a.preset, log)
    ctx = compare.Context(args, checkpoint, out, log)
    ctx.aiperf = compare.ensure_venv("aiperf", ctx).parent / "aiperf"
    port = compare.free_port()
    url = f"http://127.0.0.1:{port}"
    launch = compare.prepare_ours(ctx, port)
    proc = compare.start(launch, out / "logs" / "ours.log")
    report: dict[str, Any] = {"schema": SCHEMA, "args": {k: str(v) for k, v in vars(a).items()}, "runs": []}
    try:
        log(f"ours ready after {compare.wait_ready(proc, url, launch.ready_path, 600, out / 'logs' / 'ours.log'):.0f}s")

        def run(name: str, entries: list[dict[str, Any]]) -> Path:
            data = out / f"{name}.jsonl"
            data.write_text("".join(json.dumps(e) + "\n" for e in entries))
            run_dir = out / name
            run_dir.mkdir(parents=True, exist_ok=True)
            argv_ = aiperf_argv(ctx.aiperf, url, checkpoint, data, a.concurrency, len(entries), run_dir)
            with (run_dir / "aiperf.out").open("w") as f:
                rc = subprocess.run(argv_, stdout=f, stderr=subprocess.STDOUT, cwd=run_dir).returncode
            if rc != 0:
                raise SystemExit(f"aiperf exited {rc}: see {run_dir / 'aiperf.out'}")
            return run_dir

        run("warmup", dataset(a.concurrency, a.plain_tokens, seed=10_000))  # a mixed run of its own prompts
        lengths: list[int] | None = None
        for i in range(a.rounds):
            # odd rounds run plain first (with the lengths of the mixed run before): a drift of the machine's
            # speed during the benchmark then favours neither kind
            for kind in ("mixed", "plain") if i % 2 == 0 else ("plain", "mixed"):
                entries = dataset(a.num_requests, a.plain_tokens, seed=2 * i + (kind == "plain"), lengths=lengths)
                run_dir = run(f"{kind}-{i}", entries)
                if kind == "mixed":
                    by_text = completion_tokens(run_dir)
                    lengths = [by_text[e["text"]] for e in entries[1::2]]
                figures = {"kind": kind, "round": i,
                           **groups(run_dir, {e["text"] for e in entries[1::2]},
                                    "constrained" if kind == "mixed" else "stand-in")}
                report["runs"].append(figures)
                log(json.dumps(figures))
    finally:
        compare.stop(proc)
    report["summary"] = summary(report["runs"])
    (out / "results.json").write_text(json.dumps(report, indent=2))
    log(json.dumps(report["summary"], indent=2))
    return 0


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    mixed = [r for r in runs if r["kind"] == "mixed"]
    plain = [r for r in runs if r["kind"] == "plain"]
    c_itl = statistics.fmean(r["constrained"]["itl_ms_mean"] for r in mixed)
    s_itl = statistics.fmean(r["stand-in"]["itl_ms_mean"] for r in plain)
    p_itl_mixed = statistics.fmean(r["plain"]["itl_ms_mean"] for r in mixed)
    p_itl_plain = statistics.fmean(r["plain"]["itl_ms_mean"] for r in plain)
    return {
        "constrained_itl_ms": round(c_itl, 2),
        "plain_itl_ms_in_mixed_runs": round(p_itl_mixed, 2),
        "plain_itl_ms_in_plain_runs": round(p_itl_plain, 2),
        "stand_in_itl_ms_in_plain_runs": round(s_itl, 2),
        "constrained_vs_plain_itl (target <= 1.2)": round(c_itl / p_itl_mixed, 3),
        "constrained_vs_its_stand_in_itl": round(c_itl / s_itl, 3),
        # a plain request's token rate is 1 / ITL: the loss is how much slower it streams with the others constrained
        "plain_half_token_rate_loss (target <= 0.05)": round(1 - p_itl_plain / p_itl_mixed, 3),
        "output_tok_s_mixed": round(statistics.fmean(r["output_tok_s"] for r in mixed), 2),
        "output_tok_s_plain": round(statistics.fmean(r["output_tok_s"] for r in plain), 2),
        # per round (a mixed run and the plain run right after it): one disturbed run moves the means above,
        # the median of the rounds much less
        "per_round_constrained_vs_plain_itl": [round(m["constrained"]["itl_ms_mean"] / m["plain"]["itl_ms_mean"], 3)
                                               for m in mixed],
        "per_round_plain_half_loss": [round(1 - p["plain"]["itl_ms_mean"] / m["plain"]["itl_ms_mean"], 3)
                                      for m, p in zip(mixed, plain, strict=True)],
        "median_round_plain_half_loss": round(statistics.median(
            1 - p["plain"]["itl_ms_mean"] / m["plain"]["itl_ms_mean"] for m, p in zip(mixed, plain, strict=True)), 3),
    }


if __name__ == "__main__":
    raise SystemExit(main())
