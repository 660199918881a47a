"""The running batch: each step one pass over the weights for every token it computes (the running rows'
decode step, new prompts, a long prompt's next chunk) as one flat batch, over the rows `KVRows` keeps.

With plain values (sequence ids, token lists): the engine drives it from the scheduler's plan; tests and
the GPU check drive it directly.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from .cuda_graphs import DecodeGraphs, StepGraphs
from .falcon import FalconRunner, Segment, StepBatch
from .kv_rows import KVRows
from .prefix_cache import PrefixMatch


@dataclass(frozen=True)
class NewPrompt:
    """A prompt prefilled whole in one step, after what `match` says the prefix cache holds; its sequences
    `seq_ids` (n choices) share the prefill."""

    seq_ids: tuple[int, ...]
    prompt: Seq[int]
    match: PrefixMatch | None = None
    salt: int = 0


@dataclass(frozen=True)
class StagedChunk:
    """Tokens start..end of a long prompt, prefilled in the staging row; the first chunk starts after what
    `match` holds (given with the first chunk only), and after the last the prompt's sequences `seq_ids` join
    the running rows."""

    seq_ids: tuple[int, ...]
    prompt: Seq[int]
    start: int
    end: int
    match: PrefixMatch | None = None
    salt: int = 0

    @property
    def last(self) -> bool:
        return self.end == len(self.prompt)


class RunningBatch:
    """Steps over a runner's KV rows. `run` returns one row of logits per sequence sampled at this step, in
    row order: the decoding rows, then each new prompt's sequences, then the staged prompt's once whole.

    `graphs` replays pure decode steps as CUDA graphs, `step_graphs` the steps that prefill, by token count (or,
    in tests, what stands in for them).
    """

    def __init__(self, runner: FalconRunner, graphs: DecodeGraphs | None = None, prefix_caching: bool = False,
                 step_graphs: StepGraphs | None = None) -> None:
        self.runner = runner
        self.graphs = graphs
        self.step_graphs = step_graphs
        # cascade attention (rows attending to a shared prefix together) is for eager steps: a captured graph
        # has fixed shapes
        self.rows = KVRows(runner, prefix_caching, cascade=graphs is None)

    @property
    def ids(self) -> list[int]:
        """The running sequences, in row order."""
        return self.rows.ids

    @property
    def size(self) -> int:
        return self.rows.size

    @property
    def lengths(self) -> list[int]:
        return self.rows.lengths

    @property
    def cache_tokens(self) -> int:
        return self.rows.cache_tokens

    @property
    def idle_tokens(self) -> int:
        return self.rows.idle_tokens

    def lookup(self, prompt: Seq[int], salt: int = 0) -> PrefixMatch | None:
        return self.rows.lookup(prompt, salt)

    def free(self, seq_ids: Seq[int], keep: dict[int, tuple[Seq[int], int]] | None = None,
             pinned: Seq[PrefixMatch | None] = ()) -> None:
        """Free these sequences' rows (keeping prefixes worth keeping); the `pinned` matches stay good."""
        self.rows.free(seq_ids, keep, pinned)

    def set_tokens(self, first_row: int, tokens: torch.Tensor | Seq[int]) -> None:
        self.rows.set_tokens(first_row, tokens)

    def run(self, decode: bool, prompts: Seq[NewPrompt] = (), chunk: StagedChunk | None = None) -> torch.Tensor:
        """One step: a token for every running row (with `decode`, from the tokens set last), the new prompts,
        and the staged prompt's next chunk, in one pass."""
        rows = self.rows
        count = rows.size if decode else 0
        placed = rows.place([(p.seq_ids, p.prompt, p.match, p.salt) for p in prompts])
        segments = [p.segment for p in placed]
        if chunk is not None:
            segments.append(self._stage(chunk))
        logits = self._forward(count, segments)
        if count:
            rows.advance()
        if placed:
            rows.join(placed)
        repeats = [len(p.seq_ids) for p in prompts]
        if chunk is not None and chunk.last:
            rows.adopt_staged(chunk.seq_ids, chunk.prompt, chunk.salt)
            repeats.append(len(chunk.seq_ids))
        elif chunk is not None:  # a chunk before the last: its logits serve nobody yet
            logits = logits[:-1]
        if any(r != 1 for r in repeats):  # n choices share their prompt's logits
            index = list(range(count)) + [count + i for i, r in enumerate(repeats) for _ in range(r)]
            logits = logits.index_select(0, self.runner.io.upload(index, torch.long))
        return logits

    def _stage(self, chunk: StagedChunk) -> Segment:
        return self.rows.stage(chunk.prompt[chunk.start : chunk.end], chunk.start, chunk.match)

    def _forward(self, count: int, segments: list[Segment]) -> torch.Tensor:
        """Logits of the step's pass: the decode rows 0..count-1, then each segment's last token."""
        width = self.rows.decode_width() if count else 0
        if count and not segments and self.graphs is not None:
            return self.graphs.decode(count, width)
        shared = self.rows.shared_prefix() if count else None
        batch = StepBatch(self.runner, count, width, shared, segments)
        if segments and self.step_graphs is not None:
            return self.step_graphs.forward(batch)
        return self.runner.forward(batch)
