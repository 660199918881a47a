"""The running batch: which KV-cache rows hold which sequences; add (prefill), step (decode), remove.

Each sequence owns one row of the runner's preallocated cache, and the rows in use are kept
compact at the front (0..size-1), so a decode step reads the cache as views, with no copy. A
sequence that leaves has its row refilled by the last row; nothing else moves. A row's
positions start at 0 whatever the other rows hold, so results do not depend on the batch.

The runner's last row is the staging row: a prompt too long for one step is prefilled there a
chunk at a time, between decode steps of the batch, and joins the batch once it is complete.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from .falcon import FalconRunner


class RunningBatch:
    """Row i belongs to the caller's sequence i; `remove` says how the rows were reordered."""

    def __init__(self, runner: FalconRunner) -> None:
        self.runner = runner
        self.lengths: list[int] = []  # tokens cached per row
        self._lengths = torch.zeros(0, dtype=torch.long, device=runner.device)

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.runner.rows - 1  # the last row stages chunked prefills

    @property
    def staging_row(self) -> int:
        return self.runner.rows - 1

    @property
    def cache_tokens(self) -> int:
        """Tokens held in the KV cache."""
        return sum(self.lengths)

    def add(self, prompts: Seq[Seq[int]], repeats: Seq[int]) -> torch.Tensor:
        """Prefill each prompt once into new rows at the end; prompt i then fills `repeats[i]` rows
        (n choices share the prefill). Returns the next-token logits, one row per new row."""
        firsts = self._new_rows(repeats)
        logits = self.runner.prefill(firsts, prompts, [0] * len(prompts))
        return self._fill(firsts, prompts, repeats, logits)

    def step_and_add(self, tokens: Seq[int], prompts: Seq[Seq[int]], repeats: Seq[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` for the running rows and `add` for new prompts, in one pass over the weights."""
        firsts = self._new_rows(repeats)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.runner.device)
        decoded, prefilled = self.runner.decode_and_prefill(ids, self._lengths, firsts, prompts, [0] * len(prompts))
        self.lengths = [n + 1 for n in self.lengths]
        return decoded, self._fill(firsts, prompts, repeats, prefilled)

    def _new_rows(self, repeats: Seq[int]) -> list[int]:
        """The first of the rows at the end that each prompt will fill."""
        if self.size + sum(repeats) > self.capacity:
            raise RuntimeError(f"batch of {self.capacity} rows is full")
        firsts, row = [], self.size
        for r in repeats:
            firsts.append(row)
            row += r
        return firsts

    def _fill(self, firsts: list[int], prompts: Seq[Seq[int]], repeats: Seq[int], logits: torch.Tensor
              ) -> torch.Tensor:
        """Copy each prefilled row to its repeats; returns the logits, one row per new row."""
        for first, prompt, r in zip(firsts, prompts, repeats, strict=True):
            for extra in range(first + 1, first + r):
                self.runner.copy_row(first, extra, len(prompt))
            self.lengths += [len(prompt)] * r
        self._lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.runner.device)
        if any(r != 1 for r in repeats):
            logits = logits.repeat_interleave(torch.tensor(list(repeats), device=logits.device), dim=0)
        return logits

    def stage(self, chunk: Seq[int], offset: int) -> torch.Tensor:
        """Prefill the next chunk of a long prompt (tokens `offset`..) into the staging row."""
        return self.runner.prefill([self.staging_row], [chunk], [offset])

    def adopt_staged(self, length: int, repeats: int) -> None:
        """The staged prompt (`length` tokens) joins the batch, in `repeats` new rows at the end."""
        if self.size + repeats > self.capacity:
            raise RuntimeError(f"batch of {self.capacity} rows is full")
        for row in range(self.size, self.size + repeats):
            self.runner.copy_row(self.staging_row, row, length)
        self.lengths += [length] * repeats
        self._lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.runner.device)

    def step(self, tokens: Seq[int]) -> torch.Tensor:
        """Feed one token per row (rows 0..size-1); returns the next-token logits (size, vocab)."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.runner.device)
        logits = self.runner.decode(ids, self._lengths)
        self._lengths += 1
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def remove(self, rows: Seq[int]) -> list[int]:
        """Free the given rows; returns `order`: row i now holds what row `order[i]` held."""
        order = list(range(self.size))
        for row in sorted(set(rows), reverse=True):
            last = len(order) - 1
            if row != last:
                self.runner.copy_row(last, row, self.lengths[last])
                order[row] = order[last]
                self.lengths[row] = self.lengths[last]
            order.pop()
            self.lengths.pop()
        self._lengths = torch.tensor(self.lengths, dtype=torch.long, device=self.runner.device)
        return order
