"""The KV cache: one preallocated row of a whole context per sequence, and how many rows fit.

Falcon-7B uses multi-query attention: one KV head of 64 dims per layer, so a token costs
2 (K and V) x 32 layers x 64 x 2 bytes = 8 KiB in bf16, and a 2,048-token row 16 MiB.
"""

from __future__ import annotations

import torch


def kv_heads(config) -> int:
    if getattr(config, "new_decoder_architecture", False):
        return config.num_kv_heads
    if getattr(config, "multi_query", False):
        return 1
    return config.num_attention_heads


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token takes across all layers (Falcon-7B, bf16: 8 KiB)."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads(config) * head_dim * dtype.itemsize


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations on `device`: the GPU's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_host_memory()


def available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def default_kv_budget(config, dtype: torch.dtype, device: torch.device, memory_fraction: float, max_rows: int,
                      max_len: int) -> int:
    """KV-cache tokens that fit in `memory_fraction` of the free memory of `device` (the model loaded).

    Never below one full-length sequence, never above `max_rows` full-length sequences.
    """
    budget = int(available_memory(device) * memory_fraction) // kv_bytes_per_token(config, dtype)
    return max(max_len, min(budget, max_rows * max_len))


class KVCache:
    """Keys and values of the row pool, each row up to `max_len` tokens: (layers, rows, max_len, head_dim) each.

    The pool's `pool_rows` rows hold the running sequences (at most `batch_rows` of them, kept at
    the front) and, in the rows they leave free, the prefixes of finished ones for reuse. After the
    pool come the staging row (a long prompt prefilled a chunk at a time) and the scratch row (where
    padded decode rows write, so that they touch no real row).
    """

    def __init__(self, layers: int, batch_rows: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, pool_rows: int | None = None) -> None:
        self.batch_rows, self.max_len = batch_rows, max_len
        self.pool_rows = max(pool_rows or batch_rows, batch_rows)
        self.staging_row, self.scratch_row = self.pool_rows, self.pool_rows + 1
        shape = (layers, self.pool_rows + 2, max_len, head_dim)
        # zeros, not empty: attention multiplies the masked slots by 0, and 0 * NaN (which fresh memory
        # can hold) would poison the row
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def rows(self) -> int:
        return self.keys.shape[1]

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.keys.shape[0] * self.keys.shape[-1] * self.keys.element_size()

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Give row `dst` the first `length` cached tokens of row `src` (n choices share a prompt)."""
        if length > 0 and src != dst:
            self.keys[:, dst, :length] = self.keys[:, src, :length]
            self.values[:, dst, :length] = self.values[:, src, :length]
