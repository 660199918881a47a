"""Per-turn figures of a multi-turn run of compare.py (`--aiperf-args "--conversation-turn-mean N"`).

From aiperf's per-request records of each peer: per turn, the requests, the prompt tokens, the prompt
tokens the server reported as cached (`usage.prompt_tokens_details.cached_tokens`, which aiperf reads
as `usage_prompt_cache_read_tokens`), the hit rate (cached / prompt tokens) and TTFT.

    .venv/bin/python benchmarks/per_turn.py RUN_DIR [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any


def _value(record: dict, name: str) -> float | None:
    item = record["metrics"].get(name)
    return None if item is None else item["value"]


def per_turn(records_path: Path) -> list[dict[str, Any]]:
    turns: dict[int, list[dict]] = defaultdict(list)
    with records_path.open() as f:
        for line in f:
            record = json.loads(line)
            meta = record["metadata"]
            if meta.get("benchmark_phase") == "profiling" and not record.get("error"):
                turns[meta["turn_index"]].append(record)
    rows = []
    for turn, records in sorted(turns.items()):
        prompt = [_value(r, "usage_prompt_tokens") or _value(r, "input_sequence_length") or 0 for r in records]
        cached = [_value(r, "usage_prompt_cache_read_tokens") for r in records]
        known = [c for c in cached if c is not None]
        ttft = [_value(r, "time_to_first_token") for r in records]
        rows.append({
            "turn": turn + 1,
            "requests": len(records),
            "prompt_tokens_mean": round(statistics.fmean(prompt), 1),
            "cached_tokens_mean": round(statistics.fmean(known), 1) if known else None,
            "hit_rate": round(sum(known) / sum(prompt), 3) if known and len(known) == len(prompt) else None,
            "ttft_ms_p50": round(statistics.median(t for t in ttft if t is not None), 1),
        })  # fmt: skip
    return rows


def table(run_dir: Path, concurrency: int) -> str:
    lines = ["| peer | turn | requests | prompt tok | cached tok | hit rate | TTFT p50 ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for peer_dir in sorted((run_dir / "aiperf").iterdir()):
        path = peer_dir / f"c{concurrency}" / "profile_export.jsonl"
        if not path.exists():
            continue
        for row in per_turn(path):
            cached = "-" if row["cached_tokens_mean"] is None else f"{row['cached_tokens_mean']:,.0f}"
            hit = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.0%}"
            lines.append(f"| {peer_dir.name} | {row['turn']} | {row['requests']} | {row['prompt_tokens_mean']:,.0f} | "
                         f"{cached} | {hit} | {row['ttft_ms_p50']:,.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--concurrency", type=int, default=16)
    a = p.parse_args(argv)
    print(table(a.run_dir, a.concurrency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
