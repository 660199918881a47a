"""One attention kernel for a whole step's flat batch (GPU, Triton): every token, decode row or prompt token,
attends over its own row of the KV cache up to its position, in one launch per layer.

The split attention of `StepBatch` (decode rows as views, prompt segments padded to one width) takes several
kernels a layer; between the captured pieces of a mixed step (`cuda_graphs.StepGraphs`) each of them is a
launch from the host. This kernel is the alternative the GPU check measures against it (`FALCON_ATTENTION`).

Falcon-7B has one KV head: a token's 71 query heads share its row's keys, so one program takes all the heads
of one token (the heads are the rows of its matrix products) and walks the row's keys in blocks, with the
online softmax in float32. A prompt token walks as far as its own position: causal by construction.

Triton is imported when a kernel is first built; a machine without it (a CPU) never needs it. Under
`TRITON_INTERPRET=1` it runs on CPU tensors too (slowly): that is how it is tested without a GPU.
"""

from __future__ import annotations

import functools

import torch

BLOCK_N = 64  # keys per block


def available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def attend(q_ptr, k_ptr, v_ptr, out_ptr, rows_ptr, positions_ptr, scale,
               stride_row, stride_pos, heads, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_N: tl.constexpr):
        token = tl.program_id(0)
        head_block = tl.program_id(1)
        row = tl.load(rows_ptr + token)
        position = tl.load(positions_ptr + token)
        offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, HEAD_DIM)
        head_mask = offs_h < heads
        q_offsets = token * heads * HEAD_DIM + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
        q = tl.load(q_ptr + q_offsets, mask=head_mask[:, None], other=0.0)
        best = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, HEAD_DIM), dtype=tl.float32)
        row_start = row.to(tl.int64) * stride_row
        for start in range(0, position + 1, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            key_mask = offs_n <= position
            kv_offsets = row_start + offs_n[:, None] * stride_pos + offs_d[None, :]
            k = tl.load(k_ptr + kv_offsets, mask=key_mask[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
            scores = tl.where(key_mask[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            weights = tl.exp(scores - new_best[:, None])
            keep = tl.exp(best - new_best)
            total = total * keep + tl.sum(weights, 1)
            v = tl.load(v_ptr + kv_offsets, mask=key_mask[:, None], other=0.0)
            acc = acc * keep[:, None] + tl.dot(weights.to(v.dtype), v).to(tl.float32)
            best = new_best
        out = acc / total[:, None]
        tl.store(out_ptr + q_offsets, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None])

    return attend


def varlen_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor,
                     positions: torch.Tensor, scale: float) -> torch.Tensor:
    """q (T, H, D): each token's queries; keys and values (R, L, D): one layer's cache, one KV head, which holds
    each token's own key and value already; token t attends over row `rows[t]`, positions 0..`positions[t]`.
    Returns (T, H, D) in q's dtype."""
    tokens, heads, dim = q.shape
    assert keys.stride(-1) == 1 and keys.stride() == values.stride() and q.is_contiguous()
    out = torch.empty_like(q)
    block_h = max(16, min(128, 1 << (heads - 1).bit_length()))
    grid = (tokens, -(-heads // block_h))
    _kernel()[grid](q, keys, values, out, rows, positions, scale, keys.stride(0), keys.stride(1), heads,
                    HEAD_DIM=dim, BLOCK_H=block_h, BLOCK_N=BLOCK_N)
    return out
