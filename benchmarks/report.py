"""Markdown table, target check and PNG plot for the aiperf results of one or more servers.

Input everywhere: a list of peers, each `{"peer": name, "status": "ok" | "did not start: ...",
"load": <aiperf_load.run_load report> | None}`. `python report.py results.json plot.png [title]` draws
the plot of a compare.py run (in the aiperf venv, which has matplotlib).
"""

from __future__ import annotations

import json
import sys
from typing import Any

# aiperf's metrics: output_token_throughput, request_throughput, time_to_first_token,
# inter_token_latency, inter_chunk_latency, request_latency, output_sequence_length (README.md)
COLUMNS = [
    ("peer", None),
    ("conc.", None),
    ("output tok/s", "output_tok_s"),
    ("req/s", "req_s"),
    ("TTFT p50 ms", ("ttft_ms", "p50")),
    ("TTFT p95 ms", ("ttft_ms", "p95")),
    ("ITL p50 ms", ("itl_ms", "p50")),
    ("ITL p95 ms", ("itl_ms", "p95")),
    ("chunk gap p50 ms", ("icl_ms", "p50")),
    ("e2e p50 ms", ("e2e_ms", "p50")),
    ("e2e p95 ms", ("e2e_ms", "p95")),
    ("tok/req", "tokens_per_request_mean"),
    ("usage tok/s", "usage_tok_s"),
    ("errors", "errors"),
    ("aiperf CPU", ("cpu", "client_cpu_share")),
    ("other CPU", ("cpu", "other_cpu_share")),
]


def _get(level: dict, key: Any) -> Any:
    if isinstance(key, tuple):
        v = (level.get(key[0]) or {}).get(key[1])
        return f"{v:.0%}" if key[0] == "cpu" and v is not None else v
    return level.get(key)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def markdown_table(peers: list[dict]) -> str:
    """One row per peer and concurrency level; a peer that did not start gets one row saying why."""
    lines = [
        "| " + " | ".join(c[0] for c in COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    for p in peers:
        load = p.get("load")
        if p.get("status") != "ok" or not load:
            reason = str(p.get("status", "did not start")).replace("|", "/").replace("\n", " ")
            lines.append(f"| {p['peer']} | – | {reason} |" + " |" * (len(COLUMNS) - 3))
            continue
        for lv in load["levels"]:
            if "ttft_ms" not in lv:  # aiperf itself failed on this level
                lines.append(f"| {p['peer']} | {lv['concurrency']} | failed: {next(iter(lv['error_samples']), '?')} |"
                             + " |" * (len(COLUMNS) - 3))  # fmt: skip
                continue
            cells = [p["peer"], str(lv["concurrency"])] + [_fmt(_get(lv, k)) for _, k in COLUMNS[2:]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _level(peers: list[dict], name: str, concurrency: int) -> dict | None:
    for p in peers:
        if p["peer"] == name and p.get("status") == "ok" and p.get("load"):
            for lv in p["load"]["levels"]:
                if lv["concurrency"] == concurrency and lv["completed"] > 0 and lv.get("output_tok_s"):
                    return lv
    return None


def target_check(peers: list[dict], ours: str = "ours", vllm: str = "vllm", seed: str = "seed") -> list[str]:
    """The issue's targets as ratios within this run (16 clients vs vLLM, 1 client vs the seed)."""
    out = []
    o16, v16 = _level(peers, ours, 16), _level(peers, vllm, 16)
    if o16 and v16 and v16["output_tok_s"]:
        ratio = o16["output_tok_s"] / v16["output_tok_s"]
        out.append(
            f"16 clients: {ours} {o16['output_tok_s']} tok/s vs {vllm} {v16['output_tok_s']} tok/s "
            f"= {ratio:.2f}x (target >= 1.25x): {'MET' if ratio >= 1.25 else 'NOT MET'}"
        )
        ot, vt = o16["ttft_ms"]["p50"], v16["ttft_ms"]["p50"]
        if ot is not None and vt is not None:
            out.append(
                f"16 clients: TTFT p50 {ours} {ot} ms vs {vllm} {vt} ms (target <=): {'MET' if ot <= vt else 'NOT MET'}"
            )
    else:
        out.append(f"16 clients vs {vllm}: not measured (needs both {ours} and {vllm} at concurrency 16)")
    o1, s1 = _level(peers, ours, 1), _level(peers, seed, 1)
    if o1 and s1 and s1["output_tok_s"]:
        ok = o1["output_tok_s"] >= s1["output_tok_s"]
        out.append(
            f"1 client: {ours} {o1['output_tok_s']} tok/s vs {seed} {s1['output_tok_s']} tok/s "
            f"(target >=): {'MET' if ok else 'NOT MET'}"
        )
    else:
        out.append(f"1 client vs {seed}: not measured (needs both {ours} and {seed} at concurrency 1)")
    return out


def plot(peers: list[dict], path: str, title: str | None = None) -> None:
    """Output tokens/s and TTFT p50 against concurrency, one line per peer that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_tp, ax_ttft) = plt.subplots(1, 2, figsize=(12, 4.8))
    levels: set[int] = set()
    skipped = []
    for p in peers:
        load = p.get("load")
        if p.get("status") != "ok" or not load:
            skipped.append(f"{p['peer']}: {p.get('status')}")
            continue
        lv = [x for x in load["levels"] if x["completed"] > 0 and x.get("output_tok_s")]
        if not lv:
            skipped.append(f"{p['peer']}: every request failed")
            continue
        xs = [x["concurrency"] for x in lv]
        levels.update(xs)
        (line,) = ax_tp.plot(xs, [x["output_tok_s"] for x in lv], marker="o", label=p["peer"])
        color = line.get_color()
        ax_ttft.plot(xs, [x["ttft_ms"]["p50"] for x in lv], marker="o", label=p["peer"], color=color)
        ax_ttft.fill_between(
            xs,
            [x["ttft_ms"]["p50"] for x in lv],
            [x["ttft_ms"]["p95"] for x in lv],
            alpha=0.12,
            color=color,
        )
    for ax in (ax_tp, ax_ttft):
        ax.set_xscale("log", base=2)
        if levels:
            ax.set_xticks(sorted(levels))
            ax.set_xticklabels([str(x) for x in sorted(levels)])
        ax.set_xlabel("concurrent streaming clients")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax_tp.set_ylabel("output tokens/s")
    ax_tp.set_title("Throughput")
    ax_ttft.set_yscale("log")
    ax_ttft.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax_ttft.set_ylabel("TTFT p50 (ms, log; band to p95)")
    ax_ttft.set_title("Time to first token")
    if title:
        fig.suptitle(title)
    if skipped:
        fig.text(0.01, 0.01, "not shown: " + "; ".join(s[:90] for s in skipped), fontsize=8, color="darkred")
    fig.tight_layout(rect=(0, 0.05 if skipped else 0, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        results = json.load(f)
    plot(results["peers"], sys.argv[2], title=sys.argv[3] if len(sys.argv) > 3 else None)
