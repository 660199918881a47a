"""The running batch: left-padded KV cache, attention mask and positions; prefill, step, concatenate, filter.

Rows are left-padded to a common width. A row's positions count only its real tokens,
so padding never changes what a sequence computes (results do not depend on the batch).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from transformers import DynamicCache, PreTrainedModel


class RunningBatch:
    """Model state of the sequences decoding together; row i belongs to sequence i of the caller."""

    def __init__(self, cache: DynamicCache, attention_mask: torch.Tensor, next_positions: torch.Tensor) -> None:
        self.cache = cache
        self.attention_mask = attention_mask  # (rows, width), 0 on the left padding
        self.next_positions = next_positions  # (rows,), position of the token each row feeds next

    @property
    def size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def width(self) -> int:
        return self.attention_mask.shape[1]

    @property
    def cache_tokens(self) -> int:
        """KV-cache slots held, padding included (what the memory budget pays for)."""
        return self.size * self.width

    @classmethod
    @torch.inference_mode()
    def prefill(
        cls, model: PreTrainedModel, prompts: Seq[Seq[int]], repeats: Seq[int]
    ) -> tuple[RunningBatch, torch.Tensor]:
        """Run the prompts once each; row i is then repeated `repeats[i]` times (n choices share it).

        Returns the batch and the last-position logits, one row per repeated sequence.
        """
        device = model.device
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :]
        batch = cls(out.cache, mask, mask.sum(-1))
        if any(r != 1 for r in repeats):
            index = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor(list(repeats)))
            batch = batch.select(index.tolist())
            logits = logits[index.to(logits.device)]
        return batch, logits

    @torch.inference_mode()
    def step(self, model: PreTrainedModel, tokens: Seq[int]) -> torch.Tensor:
        """Feed one new token per row; returns the next-token logits (rows, vocab)."""
        device = self.attention_mask.device
        ids = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(-1)
        self.attention_mask = torch.cat(
            [self.attention_mask, self.attention_mask.new_ones(self.size, 1)], dim=1
        )
        out = model(
            input_ids=ids, attention_mask=self.attention_mask, position_ids=self.next_positions.unsqueeze(-1),
            cache=self.cache, use_cache=True,
        )
        self.cache = out.cache
        self.next_positions = self.next_positions + 1
        return out.logits[:, -1, :]

    def select(self, rows: Seq[int]) -> RunningBatch:
        """Keep (or repeat) the given rows, in that order, and drop padding no row needs any more."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else mask.shape[1]
        cache = DynamicCache()
        for layer_idx, layer in enumerate(self.cache.layers):
            keys = layer.keys.index_select(0, index)[:, :, start:]
            values = layer.values.index_select(0, index)[:, :, start:]
            cache.update(keys.contiguous(), values.contiguous(), layer_idx)
        return RunningBatch(cache, mask[:, start:].contiguous(), self.next_positions.index_select(0, index))

    def concatenate(self, other: RunningBatch) -> RunningBatch:
        """Join two batches (self's rows first), left-padding the narrower one."""
        width = max(self.width, other.width)
        masks = [_pad_left(b.attention_mask, width, dim=1) for b in (self, other)]
        cache = DynamicCache()
        for layer_idx, (a, b) in enumerate(zip(self.cache.layers, other.cache.layers, strict=True)):
            keys = torch.cat([_pad_left(a.keys, width, dim=2), _pad_left(b.keys, width, dim=2)])
            values = torch.cat([_pad_left(a.values, width, dim=2), _pad_left(b.values, width, dim=2)])
            cache.update(keys, values, layer_idx)
        return RunningBatch(cache, torch.cat(masks), torch.cat([self.next_positions, other.next_positions]))


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
