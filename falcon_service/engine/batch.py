"""The running batch: which KV-cache rows hold which sequences; add (prefill), step (decode), remove.

Each sequence owns one row of the runner's preallocated cache, and the rows in use are kept
compact at the front (0..size-1), so a decode step reads the cache as views, with no copy. A
sequence that leaves has its row refilled by the last row; nothing else moves. A row's
positions start at 0 whatever the other rows hold, so results do not depend on the batch.

The host keeps each row's length; the device keeps the runner's decode buffers in step with it
(lengths, where each row writes, the token each row feeds next). The tokens a step samples stay
on the device and become the next step's input (`set_tokens`), so a decode step needs nothing
from the host but the batch's shape.

The staging row (after the batch's rows) holds a prompt too long for one step, prefilled there a
chunk at a time between decode steps of the batch; it joins the batch once it is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from .falcon import FalconRunner

DecodeFn = Callable[[int, int], torch.Tensor]  # (rows, attention width) -> logits


class RunningBatch:
    """Row i belongs to the caller's sequence i; `remove` says how the rows were reordered.

    `decode_fn` runs a decode step over the runner's buffers (default: `runner.decode`; the engine
    passes CUDA-graph replay on a GPU).
    """

    def __init__(self, runner: FalconRunner, decode_fn: DecodeFn | None = None) -> None:
        self.runner = runner
        self.io = runner.io
        self.lengths: list[int] = []  # tokens cached per row
        self._decode = decode_fn or runner.decode
        self._sync_buffers()

    @property
    def size(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.runner.batch_rows

    @property
    def staging_row(self) -> int:
        return self.runner.cache.staging_row

    @property
    def cache_tokens(self) -> int:
        """Tokens held in the KV cache."""
        return sum(self.lengths)

    def _sync_buffers(self) -> None:
        """Upload each row's length and write row after the batch's rows changed; unused slots get
        position 0 and the scratch row, so a padded decode step touches no real row."""
        free = self.capacity - self.size
        self.runner.lengths.copy_(self.io.upload(self.lengths + [0] * free, torch.long))
        rows = list(range(self.size)) + [self.runner.cache.scratch_row] * free
        self.runner.write_rows.copy_(self.io.upload(rows, torch.long))

    def set_tokens(self, first_row: int, tokens: torch.Tensor | Seq[int]) -> None:
        """Rows first_row.. feed these tokens at their next decode step (sampled tokens stay on the device)."""
        if not isinstance(tokens, torch.Tensor):
            tokens = self.io.upload(list(tokens), torch.long)
        self.runner.tokens[first_row : first_row + tokens.shape[0]] = tokens

    def _width(self) -> int:
        """Positions a decode step attends over: each row's cache plus its new token."""
        return max(self.lengths) + 1

    def add(self, prompts: Seq[Seq[int]], repeats: Seq[int]) -> torch.Tensor:
        """Prefill each prompt once into new rows at the end; prompt i then fills `repeats[i]` rows
        (n choices share the prefill). Returns the next-token logits, one row per new row."""
        firsts = self._new_rows(repeats)
        logits = self.runner.prefill(firsts, prompts, [0] * len(prompts))
        return self._fill(firsts, prompts, repeats, logits)

    def step(self, tokens: Seq[int] | None = None) -> torch.Tensor:
        """Feed one token per row (rows 0..size-1; by default the tokens set with `set_tokens`);
        returns the next-token logits (size, vocab)."""
        if tokens is not None:
            self.set_tokens(0, tokens)
        logits = self._decode(self.size, self._width())
        self._advance()
        return logits

    def step_and_add(self, tokens: Seq[int] | None, prompts: Seq[Seq[int]], repeats: Seq[int]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` for the running rows and `add` for new prompts, in one pass over the weights."""
        if tokens is not None:
            self.set_tokens(0, tokens)
        count, width = self.size, self._width()
        firsts = self._new_rows(repeats)
        decoded, prefilled = self.runner.decode_and_prefill(count, width, firsts, prompts, [0] * len(prompts))
        self._advance()
        return decoded, self._fill(firsts, prompts, repeats, prefilled)

    def _advance(self) -> None:
        self.runner.lengths[: self.size] += 1
        self.lengths = [n + 1 for n in self.lengths]

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
                self.runner.cache.copy_row(first, extra, len(prompt))
            self.lengths += [len(prompt)] * r
        self._sync_buffers()
        if any(r != 1 for r in repeats):
            index = [i for i, r in enumerate(repeats) for _ in range(r)]
            logits = logits.index_select(0, self.io.upload(index, torch.long))
        return logits

    def stage(self, chunk: Seq[int], offset: int) -> torch.Tensor:
        """Prefill the next chunk of a long prompt (tokens `offset`..) into the staging row."""
        return self.runner.prefill([self.staging_row], [chunk], [offset])

    def adopt_staged(self, length: int, repeats: int) -> None:
        """The staged prompt (`length` tokens) joins the batch, in `repeats` new rows at the end."""
        if self.size + repeats > self.capacity:
            raise RuntimeError(f"batch of {self.capacity} rows is full")
        for row in range(self.size, self.size + repeats):
            self.runner.cache.copy_row(self.staging_row, row, length)
        self.lengths += [length] * repeats
        self._sync_buffers()

    def remove(self, rows: Seq[int]) -> list[int]:
        """Free the given rows; returns `order`: row i now holds what row `order[i]` held."""
        order = list(range(self.size))
        for row in sorted(set(rows), reverse=True):
            last = len(order) - 1
            if row != last:
                self.runner.cache.copy_row(last, row, self.lengths[last])
                order[row] = order[last]
                self.lengths[row] = self.lengths[last]
            order.pop()
            self.lengths.pop()
        if order != list(range(len(order))):
            moved = self.runner.tokens.index_select(0, self.io.upload(order, torch.long))
            self.runner.tokens[: len(order)] = moved
        self._sync_buffers()
        return order
