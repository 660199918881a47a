"""`RunningBatch` driven with sequences known by their row (as the tests of the rows' bookkeeping and the
flat batch read them): add, step, step_and_add, remove, stage; each is one step, one pass."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

import torch

from falcon_service.engine.batch import NewPrompt, RunningBatch, StagedChunk
from falcon_service.engine.falcon import FalconRunner
from falcon_service.engine.prefix_cache import PrefixMatch


class RowsDriver:
    """Row i is the batch's i-th running sequence; ids are given out here."""

    def __init__(self, runner: FalconRunner, prefix_caching: bool = False, graphs=None) -> None:
        self.runner = runner
        self.batch = RunningBatch(runner, graphs, prefix_caching)
        self._ids = itertools.count()
        self._staged: list[int] = []  # ids of the staged prompt's sequences

    def __getattr__(self, name: str):
        """The batch's and its rows' state and lookups (size, lengths, idle, lookup, shared_prefix...)."""
        try:
            return getattr(self.batch, name)
        except AttributeError:
            return getattr(self.batch.rows, name)

    def step_and_add(self, tokens: Seq[int] | None, prompts: Seq[Seq[int]], repeats: Seq[int],
                     matches: Seq[PrefixMatch | None] | None = None, decoding: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step of the running rows (feeding `tokens`, or those set) and new prompts in one pass;
        returns the decode rows' logits and one row of logits per new row."""
        if tokens is not None:
            self.batch.set_tokens(0, tokens)
        count = self.batch.size if decoding else 0
        matches = list(matches) if matches is not None else [None] * len(prompts)
        new = [NewPrompt(tuple(next(self._ids) for _ in range(r)), p, m)
               for p, r, m in zip(prompts, repeats, matches, strict=True)]
        logits = self.batch.run(bool(count), new)
        return logits[:count], logits[count:]

    def add(self, prompts: Seq[Seq[int]], repeats: Seq[int], matches: Seq[PrefixMatch | None] | None = None
            ) -> torch.Tensor:
        return self.step_and_add(None, prompts, repeats, matches, decoding=False)[1]

    def step(self, tokens: Seq[int] | None = None) -> torch.Tensor:
        if tokens is not None:
            self.batch.set_tokens(0, tokens)
        return self.batch.run(True)

    def remove(self, positions: Seq[int], keep: dict[int, tuple[Seq[int], int]] | None = None) -> list[int]:
        """Free the sequences of these rows (`keep`: row -> its tokens and salt, kept for reuse); returns
        `order`: row i now holds what row `order[i]` held."""
        before = list(self.batch.ids)
        self.batch.free([before[p] for p in positions], {before[p]: kept for p, kept in (keep or {}).items()})
        return [before.index(i) for i in self.batch.ids]

    def stage(self, chunk: Seq[int], offset: int, match: PrefixMatch | None = None,
              decode_tokens: Seq[int] | None = None, prompt: Seq[int] | None = None, repeats: int = 1
              ) -> torch.Tensor:
        """The next chunk of a long prompt in the staging row (in one pass with a decode step of the running
        rows when `decode_tokens` are given). With the whole `prompt` and this its last chunk, the prompt's
        `repeats` sequences join the batch; returns their logits (else nothing: a chunk's logits serve nobody)."""
        if decode_tokens is not None:
            self.batch.set_tokens(0, decode_tokens)
        count = self.batch.size if decode_tokens is not None else 0
        whole = prompt if prompt is not None else [*([0] * offset), *chunk, 0]  # (not the last chunk)
        if prompt is not None:
            self._staged = [next(self._ids) for _ in range(repeats)]
        step = StagedChunk(tuple(self._staged), whole, offset, offset + len(chunk), match)
        return self.batch.run(bool(count), chunk=step)[count:]

    def set_tokens(self, first_row: int, tokens: Seq[int]) -> None:
        self.batch.set_tokens(first_row, tokens)
