"""Falcon-7B's forward pass over a preallocated per-row KV cache, for batched serving.

transformers' `FalconForCausalLM` holds the weights; this module runs them without its
generic machinery: no cache concatenation per step (keys and values are written in place
into a (layers, rows, max_len, head_dim) buffer), multi-query attention without expanding
the single KV head, logits only for the positions that need them. Architecture: multi-query
attention, parallel attention + MLP, rotary positions (Falcon-7B / 7B-Instruct).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel


class UnsupportedModelError(ValueError):
    """The checkpoint is not of the Falcon-7B architecture this runner implements."""


def check_architecture(config) -> None:
    problems = []
    if getattr(config, "model_type", None) != "falcon":
        problems.append(f"model_type {config.model_type!r}")
    if getattr(config, "new_decoder_architecture", False):
        problems.append("new_decoder_architecture (Falcon-40B/180B)")
    if getattr(config, "alibi", False):
        problems.append("alibi positions")
    if not getattr(config, "multi_query", False):
        problems.append("no multi-query attention")
    if not getattr(config, "parallel_attn", False):
        problems.append("no parallel attention")
    if problems:
        raise UnsupportedModelError("this service runs the Falcon-7B architecture; the checkpoint has "
                                    + ", ".join(problems))


Linear = Callable[[torch.Tensor], torch.Tensor]


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """`x @ weight.T + bias`; on CPU with oneDNN, over a weight prepacked into oneDNN's blocked layout.

    The prepacked matmul is what torch.compile uses for frozen CPU linears: about 3x faster than
    the plain one at the batch sizes of decoding (measured on this project's 2-core dev machine).
    """
    if weight.device.type == "cpu" and torch.backends.mkldnn.is_available() and weight.dtype in (
        torch.float32, torch.bfloat16,
    ):
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
            torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "")
        except (RuntimeError, AttributeError):  # a torch built without it: the plain matmul
            pass
        else:
            return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return lambda x: F.linear(x, weight, bias)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class _Layer:
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    qkv: Linear
    dense: Linear
    h_to_4h: Linear
    four_h_to_h: Linear


class FalconRunner:
    """Prefill and decode steps for up to `rows` sequences of up to `max_len` tokens each.

    Row r's cache holds `lengths[r]` tokens. Rows are addressed by index; the caller keeps the
    rows it decodes together compact at the front (a decode step reads rows 0..B-1 as views,
    with no copy).
    """

    def __init__(self, model: PreTrainedModel, rows: int, max_len: int) -> None:
        cfg = model.config
        check_architecture(cfg)
        self.rows, self.max_len = rows, max_len
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.eps = cfg.layer_norm_epsilon
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.device, self.dtype = model.device, model.dtype
        t = model.transformer
        self.embed = t.word_embeddings.weight
        with torch.inference_mode():
            self.layers = [
                _Layer(
                    layer.input_layernorm.weight, layer.input_layernorm.bias,
                    make_linear(layer.self_attention.query_key_value.weight, layer.self_attention.query_key_value.bias),
                    make_linear(layer.self_attention.dense.weight, layer.self_attention.dense.bias),
                    make_linear(layer.mlp.dense_h_to_4h.weight, layer.mlp.dense_h_to_4h.bias),
                    make_linear(layer.mlp.dense_4h_to_h.weight, layer.mlp.dense_4h_to_h.bias),
                )
                for layer in t.h
            ]
            self.lm_head = make_linear(model.lm_head.weight, None)
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        with torch.inference_mode():
            positions = torch.arange(max_len, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = t.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # (max_len, head_dim)
        shape = (len(self.layers), rows, max_len, self.head_dim)
        # zeros, not empty: attention multiplies the masked slots by 0, and 0 * NaN (which fresh memory
        # can hold) would poison the row
        self.keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._positions = torch.arange(max_len, device=self.device)

    @property
    def bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.head_dim * self.keys.element_size()

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Give row `dst` the first `length` cached tokens of row `src` (n choices share a prompt)."""
        self.keys[:, dst, :length] = self.keys[:, src, :length]
        self.values[:, dst, :length] = self.values[:, src, :length]

    @staticmethod
    def _mlp_and_residual(x: torch.Tensor, h: torch.Tensor, attn: torch.Tensor, w: _Layer) -> torch.Tensor:
        mlp = w.four_h_to_h(F.gelu(w.h_to_4h(h)))
        return (mlp + attn) + x

    def decode(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """One new token for each of rows 0..B-1; `lengths` (B,) is each row's cached length (= the
        token's position). Returns next-token logits (B, vocab)."""
        logits, _ = self.forward(_DecodePlan(self, tokens, lengths), None)
        return logits

    def prefill(self, rows: Seq[int], chunks: Seq[Seq[int]], offsets: Seq[int]) -> torch.Tensor:
        """Run prompt chunks: row r gets tokens at positions offsets[i].. after what it already caches.

        Returns the logits after each chunk's last token (len(rows), vocab).
        """
        _, logits = self.forward(None, _PrefillPlan(self, rows, chunks, offsets))
        return logits

    def decode_and_prefill(
        self, tokens: torch.Tensor, lengths: torch.Tensor, rows: Seq[int], chunks: Seq[Seq[int]], offsets: Seq[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step of rows 0..B-1 and prompt chunks for other rows in one pass over the weights."""
        dec, pre = self.forward(_DecodePlan(self, tokens, lengths), _PrefillPlan(self, rows, chunks, offsets))
        assert dec is not None and pre is not None
        return dec, pre

    @torch.inference_mode()
    def forward(
        self, decode: _DecodePlan | None, prefill: _PrefillPlan | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The decoder over the tokens of both plans at once: linears and MLPs see all of them in one
        matmul; attention runs per plan (decode: batched matmuls over the cache; prefill: SDPA)."""
        plans = [p for p in (decode, prefill) if p is not None]
        ids = torch.cat([p.ids for p in plans]) if len(plans) > 1 else plans[0].ids
        split = decode.count if decode is not None else 0
        x = F.embedding(ids, self.embed)
        for layer, w in enumerate(self.layers):
            h = F.layer_norm(x, (self.hidden,), w.ln_weight, w.ln_bias, self.eps)
            qkv = w.qkv(h)
            if decode is not None and prefill is not None:
                attn = torch.cat([decode.attend(layer, qkv[:split]), prefill.attend(layer, qkv[split:])])
            else:
                attn = plans[0].attend(layer, qkv)
            x = self._mlp_and_residual(x, h, w.dense(attn), w)
        picks = []
        if decode is not None:
            picks.append(x[:split])
        if prefill is not None:
            picks.append(x[split:][prefill.last_index])
        last = torch.cat(picks) if len(picks) > 1 else picks[0]
        logits = self.lm_head(F.layer_norm(last, (self.hidden,), self.ln_f[0], self.ln_f[1], self.eps))
        if decode is None:
            return None, logits
        if prefill is None:
            return logits, None
        return logits[:split], logits[split:]


class _DecodePlan:
    """One decode step of rows 0..B-1: positions and mask, shared by all layers."""

    def __init__(self, runner: FalconRunner, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        self.runner, self.lengths = runner, lengths
        self.ids = tokens
        self.count = batch = tokens.shape[0]
        self.row_index = torch.arange(batch, device=runner.device)
        self.width = width = int(lengths.max()) + 1
        self.cos, self.sin = runner.cos[lengths].unsqueeze(1), runner.sin[lengths].unsqueeze(1)  # (B, 1, D)
        mask = torch.zeros(batch, 1, width, dtype=runner.dtype, device=runner.device)
        self.mask = mask.masked_fill_(runner._positions[:width][None, None] > lengths[:, None, None], float("-inf"))

    def attend(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        r, heads, batch = self.runner, self.runner.num_heads, self.count
        qkv = qkv.view(batch, heads + 2, r.head_dim)
        q, k, v = qkv[:, :heads], qkv[:, heads:heads + 1], qkv[:, heads + 1]
        q = q * self.cos + _rotate_half(q) * self.sin
        k = (k * self.cos + _rotate_half(k) * self.sin)[:, 0]
        r.keys[layer, self.row_index, self.lengths] = k
        r.values[layer, self.row_index, self.lengths] = v
        keys, values = r.keys[layer, :batch, :self.width], r.values[layer, :batch, :self.width]  # views, no copy
        scores = torch.baddbmm(self.mask, q, keys.transpose(1, 2), alpha=r.scale)  # (B, H, W)
        return torch.bmm(scores.softmax(-1), values).reshape(batch, heads * r.head_dim)


class _PrefillPlan:
    """Prompt chunks of some rows, right-padded to one width: positions, masks, where to write."""

    def __init__(self, runner: FalconRunner, rows: Seq[int], chunks: Seq[Seq[int]], offsets: Seq[int]) -> None:
        self.runner = runner
        dev = runner.device
        n, width_q = len(rows), max(len(c) for c in chunks)
        self.n, self.width_q = n, width_q
        ids = torch.zeros(n, width_q, dtype=torch.long)
        for i, chunk in enumerate(chunks):
            ids[i, : len(chunk)] = torch.tensor(chunk, dtype=torch.long)
        self.ids = ids.to(dev).reshape(-1)
        self.count = n * width_q
        sizes = torch.tensor([len(c) for c in chunks], device=dev)
        starts = torch.tensor(list(offsets), device=dev)
        ends = starts + sizes
        # padded query slots get the row's last real position: harmless, their outputs are never used
        positions = torch.minimum(starts[:, None] + torch.arange(width_q, device=dev)[None], ends[:, None] - 1)
        self.width_k = int(ends.max())
        key_pos = runner._positions[: self.width_k]
        allowed = (key_pos[None, None, :] <= positions[:, :, None]) & (key_pos[None, None, :] < ends[:, None, None])
        self.allowed = allowed.unsqueeze(1)  # (n, 1, Sq, Sk)
        self.row_index = torch.tensor(list(rows), device=dev)
        self.valid = torch.arange(width_q, device=dev)[None] < sizes[:, None]  # real (not padding) query slots
        self.write_rows = self.row_index[:, None].expand(n, width_q)[self.valid]
        self.write_pos = positions[self.valid]
        self.cos, self.sin = runner.cos[positions].unsqueeze(1), runner.sin[positions].unsqueeze(1)  # (n, 1, Sq, D)
        self.last_index = torch.arange(n, device=dev) * width_q + sizes - 1  # each chunk's last token

    def attend(self, layer: int, qkv: torch.Tensor) -> torch.Tensor:
        r, heads, n, width_q = self.runner, self.runner.num_heads, self.n, self.width_q
        qkv = qkv.view(n, width_q, heads + 2, r.head_dim).transpose(1, 2)
        q, k, v = qkv[:, :heads], qkv[:, heads:heads + 1], qkv[:, heads + 1:]
        q = q * self.cos + _rotate_half(q) * self.sin
        k = k * self.cos + _rotate_half(k) * self.sin
        r.keys[layer, self.write_rows, self.write_pos] = k[:, 0][self.valid]
        r.values[layer, self.write_rows, self.write_pos] = v[:, 0][self.valid]
        keys = r.keys[layer, self.row_index, : self.width_k].unsqueeze(1)
        values = r.values[layer, self.row_index, : self.width_k].unsqueeze(1)
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.allowed, enable_gqa=True)
        return attn.transpose(1, 2).reshape(n * width_q, heads * r.head_dim)
