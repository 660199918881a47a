"""Falcon-7B's forward pass over a preallocated per-row KV cache, for batched serving.

transformers' `FalconForCausalLM` holds the weights; this module runs them without its
generic machinery: no cache concatenation per step (keys and values are written in place
into the `KVCache`), multi-query attention without expanding the single KV head, logits (and
the last layer's attention and MLP) only for the positions that need them. Architecture:
multi-query attention, parallel attention + MLP, rotary positions (Falcon-7B / 7B-Instruct).

Nothing here waits for the device: shapes come from the host's own bookkeeping, index lists are
uploaded (`DeviceIO`), and a decode step reads its inputs from fixed buffers (`tokens`,
`lengths`, `write_rows`), so that it can be captured once as a CUDA graph and replayed.
Attention runs in scaled_dot_product_attention, whose kernels keep scores and softmax in float32
whatever the model's dtype.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from . import varlen_attention
from .device import DeviceIO
from .kv_cache import KVCache


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


def context_length(config) -> int:
    """Tokens one sequence may hold, prompt and output together (2,048 for Falcon-7B)."""
    return int(getattr(config, "max_position_embeddings", 2048) or 2048)


Linear = Callable[[torch.Tensor], torch.Tensor]
Attention = Literal["split", "varlen"]


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """`x @ weight.T + bias`; on CPU with oneDNN, over a weight prepacked into oneDNN's blocked layout.

    The prepacked matmul is what torch.compile uses for frozen CPU linears: about 3x faster than
    the plain one at the batch sizes of decoding (measured on this project's 2-core dev machine).
    The prepacked copy is what the returned function holds: drop `weight` and it is held once.
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


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions: `x * cos + rotate_half(x) * sin`, where rotate_half(x) = (-x2, x1) for the halves
    x1, x2 of x, in three ops: the halves swapped by a roll, with the sign in `signed_sin` = (-sin1, sin2)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)


def split_and_rotate(qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, heads: int, dim: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A flat batch's fused projection (T, (H + 2) * D) as queries (T, H, D), its one key and its value (T, D),
    the queries and the key with rotary positions (`cos`, `signed_sin`: (T, 1, D))."""
    qkv = qkv.view(-1, heads + 2, dim)
    qk = rotary(qkv[:, : heads + 1], cos, signed_sin)  # the queries and the one key get their positions together
    return qk[:, :heads], qk[:, heads], qkv[:, heads + 1]


def residual_and_norm(mlp: torch.Tensor, attn: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's output (its input `x` plus its attention's projection and its MLP: Falcon's parallel block) and
    the next layer's normed input."""
    x = (mlp + attn) + x
    return x, F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def fuse(fn: Callable) -> Callable:
    """`fn`'s small ops as one kernel each output, by torch.compile (Triton on a GPU, C++ on a CPU): the first call
    at a new shape compiles (a second shape makes the token count dynamic, so a few compiles serve every bucket);
    a CUDA graph captures what it launches like any kernel (the warm-up runs before a capture compile)."""
    return torch.compile(fn, fullgraph=True)


@dataclass(frozen=True)
class _Layer:
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    qkv: Linear
    dense: Linear
    h_to_4h: Linear
    four_h_to_h: Linear


def _linears(layer) -> list[torch.nn.Linear]:
    attn, mlp = layer.self_attention, layer.mlp
    return [attn.query_key_value, attn.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h]


def _own_small_weights(model: PreTrainedModel) -> None:
    """Give every weight that is not prepacked (embedding, layer norms) memory of its own.

    transformers maps a safetensors checkpoint into memory and its tensors are views of the file;
    while any view of a file lives, all of its pages stay mapped. Once the linears are prepacked
    and dropped, these copies let the mapping go, so the weights are held once, in the packed form.
    """
    packed = {id(m.weight) for layer in model.transformer.h for m in _linears(layer)}
    with torch.no_grad():
        for param in model.parameters():
            if id(param) not in packed:
                param.data = param.data.clone()


class FalconRunner:
    """Prefill and decode steps for up to `batch_rows` sequences of up to `max_len` tokens each.

    Row r's cache holds `lengths[r]` tokens. A decode step of `count` rows feeds `tokens[:count]`
    at positions `lengths[:count]`, writes each row's new key and value to `write_rows[:count]`
    (its own row, or the scratch row for padding) and attends over the first `width` positions of
    rows 0..count-1, read as views with no copy. The caller (`RunningBatch`) keeps these buffers.

    The cache's pool has `pool_rows` rows (default `batch_rows`): those the running batch does not
    use keep finished prefixes for reuse (`RunningBatch`).

    With `release_weights`, each linear's original weight is dropped from the model once its
    prepacked copy exists (CPU), so the weights are held once; the model is then no longer usable
    on its own.

    `attention`: how a step's attention runs (`StepBatch.attend`): "split" (decode rows and prompt segments
    apart, SDPA's kernels) or "varlen" (one Triton kernel for all of a step's tokens: varlen_attention.py).

    `fused_ops`: a layer's small ops in fewer kernels (`fuse`): rotary positions of the queries and the key in one
    (three eagerly), the two residual adds with the next layer's LayerNorm in one (three eagerly); 4 launches a
    layer fewer, 128 a Falcon-7B step. The linears, GELU, attention and the KV writes stay as they are.
    """

    def __init__(self, model: PreTrainedModel, batch_rows: int, max_len: int, release_weights: bool = False,
                 pool_rows: int | None = None, attention: Attention = "split", fused_ops: bool = False) -> None:
        cfg = model.config
        check_architecture(cfg)
        if attention == "varlen" and not varlen_attention.available():
            raise ValueError("attention 'varlen' needs Triton (a GPU's torch has it)")
        self.attention = attention
        self.fused_ops = fused_ops
        self._split_and_rotate = fuse(split_and_rotate) if fused_ops else split_and_rotate
        self._residual_and_norm = fuse(residual_and_norm) if fused_ops else residual_and_norm
        self.max_len = max_len
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.vocab_size = cfg.vocab_size
        self.eps = cfg.layer_norm_epsilon
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.device, self.dtype = model.device, model.dtype
        self.io = DeviceIO(self.device)
        t = model.transformer
        release = release_weights and self.device.type == "cpu"
        if release:
            _own_small_weights(model)
        self.embed = t.word_embeddings.weight
        with torch.inference_mode():
            self.layers = [self._layer(layer, release) for layer in t.h]
            self.lm_head = make_linear(model.lm_head.weight, None)
        self.ln_f = (t.ln_f.weight, t.ln_f.bias)
        with torch.inference_mode():
            positions = torch.arange(max_len, device=self.device)[None]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = t.rotary_emb(probe, positions)
        half = self.head_dim // 2
        # (max_len, head_dim); the sine's first half negated for `rotary`
        self.cos, self.signed_sin = cos[0], torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)
        self.cache = KVCache(len(self.layers), batch_rows, max_len, self.head_dim, self.dtype, self.device, pool_rows)
        self._positions = torch.arange(max_len, device=self.device)
        # decode inputs: fixed buffers, so that a captured decode step replays over new values
        self.tokens = torch.zeros(batch_rows, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(batch_rows, dtype=torch.long, device=self.device)
        self.write_rows = torch.full((batch_rows,), self.cache.scratch_row, dtype=torch.long, device=self.device)

    @staticmethod
    def _layer(layer, release: bool) -> _Layer:
        made = []
        for module in _linears(layer):
            made.append(make_linear(module.weight, module.bias))
            if release:
                module.weight = None  # one copy of the weights: the prepacked one the runner holds
        return _Layer(layer.input_layernorm.weight, layer.input_layernorm.bias, *made)

    @property
    def batch_rows(self) -> int:
        return self.cache.batch_rows

    @property
    def keys(self) -> torch.Tensor:
        return self.cache.keys

    @property
    def values(self) -> torch.Tensor:
        return self.cache.values

    def decode(self, count: int, width: int, shared: SharedPrefix | None = None) -> torch.Tensor:
        """One new token for each of rows 0..count-1 (from the decode buffers), attending over `width`
        positions; returns next-token logits (count, vocab). With `shared`, those rows attend to their
        common prefix in one pass (cascade attention)."""
        return self.forward(StepBatch(self, count, width, shared))

    def prefill(self, rows: Seq[int], chunks: Seq[Seq[int]], offsets: Seq[int]) -> torch.Tensor:
        """Run prompt chunks: row r gets tokens at positions offsets[i].. after what it already caches.

        Returns the logits after each chunk's last token (len(rows), vocab).
        """
        segments = [Segment(r, o, c) for r, c, o in zip(rows, chunks, offsets, strict=True)]
        return self.forward(StepBatch(self, segments=segments))

    def decode_and_prefill(self, count: int, width: int, rows: Seq[int], chunks: Seq[Seq[int]], offsets: Seq[int],
                           shared: SharedPrefix | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode step of rows 0..count-1 and prompt chunks for other rows in one pass over the weights."""
        segments = [Segment(r, o, c) for r, c, o in zip(rows, chunks, offsets, strict=True)]
        logits = self.forward(StepBatch(self, count, width, shared, segments))
        return logits[:count], logits[count:]

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """The decoder over one step's flat batch of tokens: the linears and MLPs see all of them in one
        matmul, and each layer's attention is one call (`StepBatch.attend`). Returns the logits of the
        decode rows, then of each segment's last token."""
        prefill = batch.prefill
        x = F.embedding(batch.ids, self.embed)
        h: torch.Tensor | None = self.norm(0, x)
        last_layer = len(self.layers) - 1
        for layer in range(len(self.layers)):
            assert h is not None
            q, k, v = batch.project(layer, self.qkv(layer, h))
            if prefill is not None and layer == last_layer:
                # the last layer's output is wanted only where logits are: each chunk's last token (and
                # every decode row); the chunk's other tokens need only their keys and values written
                attn = batch.attend_last(layer, q)
                x, h = prefill.pick_last(x, batch.count), prefill.pick_last(h, batch.count)
            else:
                attn = batch.attend(layer, q, k, v)
            x, h = self.post_attention(layer, x, h, attn)
        # x holds the decode rows, then each chunk's last token
        return self.logits(x)

    # the forward in pieces between the attention calls (cuda_graphs.StepGraphs captures them per token count)

    def norm(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """A layer's normed input (the first layer's; the others' come with the layer before: `post_attention`)."""
        w = self.layers[layer]
        return F.layer_norm(x, (self.hidden,), w.ln_weight, w.ln_bias, self.eps)

    def qkv(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """A layer's queries, key and value (before rotary positions) of its normed input."""
        return self.layers[layer].qkv(h)

    def rotate_and_write(self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                         rows: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each token's queries and its one key with rotary positions (`cos`, `signed_sin`: (T, 1, D)), the key and
        value written to the cache at (`rows`, `positions`); returns q (T, H, D), k and v (T, D)."""
        q, k, v = self._split_and_rotate(qkv, cos, signed_sin, self.num_heads, self.head_dim)
        self.keys[layer].index_put_((rows, positions), k)
        self.values[layer].index_put_((rows, positions), v)
        return q, k, v

    def post_attention(self, layer: int, x: torch.Tensor, h: torch.Tensor, attn: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's output (its input, plus the attention's projection and the MLP of its normed input `h`), and
        the next layer's normed input (None after the last layer)."""
        w = self.layers[layer]
        dense = w.dense(attn)
        mlp = w.four_h_to_h(F.gelu(w.h_to_4h(h)))
        if layer + 1 == len(self.layers):
            return (mlp + dense) + x, None
        following = self.layers[layer + 1]
        return self._residual_and_norm(mlp, dense, x, following.ln_weight, following.ln_bias, self.eps)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(F.layer_norm(x, (self.hidden,), self.ln_f[0], self.ln_f[1], self.eps))


@dataclass(frozen=True)
class Segment:
    """Prompt tokens for one row of the cache, at positions `start`.. (after what the row already holds)."""

    row: int
    start: int
    tokens: Seq[int]


class StepBatch:
    """One step's tokens as one flat batch: a token for each of rows 0..`count`-1 (the decode rows, read from
    the runner's buffers), then each segment's tokens; positions, rows and masks built once for all layers.

    Each layer: `project` gives every token its rotary positions and writes its key and value to the cache,
    then attention is one call (`attend`): the decode rows read their cache rows as views (or their shared
    prefix once, `shared`), the segments attend causally after what their rows hold.
    """

    def __init__(self, runner: FalconRunner, count: int = 0, width: int = 0, shared: SharedPrefix | None = None,
                 segments: Seq[Segment] = ()) -> None:
        self.runner = runner
        self.decode = _DecodePlan(runner, count, width, shared) if count else None
        self.prefill = _PrefillPlan(runner, [s.row for s in segments], [s.tokens for s in segments],
                                    [s.start for s in segments]) if segments else None
        plans = [p for p in (self.decode, self.prefill) if p is not None]
        if not plans:
            raise ValueError("a step of no tokens")

        def joined(parts: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(parts) if len(parts) > 1 else parts[0]

        self.ids = joined([p.ids for p in plans])
        self.positions = joined([p.positions for p in plans])  # where each token goes in its row
        self.write_rows = joined([p.write_rows for p in plans])  # which row each token's key and value go to
        self.cos = runner.cos[self.positions].unsqueeze(1)  # (T, 1, D), for every layer's rotary positions
        self.signed_sin = runner.signed_sin[self.positions].unsqueeze(1)
        self.count = count
        self.segments = list(segments)

    @property
    def tokens(self) -> int:
        """Tokens computed in this step."""
        return int(self.ids.shape[0])

    def logit_rows(self) -> torch.Tensor:
        """Where in the flat batch the tokens whose logits are wanted are: every decode row, each segment's last."""
        decode = self.decode.rows_index if self.decode is not None else None
        last = self.prefill.last_index + self.count if self.prefill is not None else None
        parts = [p for p in (decode, last) if p is not None]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def project(self, layer: int, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary positions for every token's queries and key; its key and value written to the cache."""
        return self.runner.rotate_and_write(layer, qkv, self.cos, self.signed_sin, self.write_rows, self.positions)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Every token's attention over its row (the cache holds this layer's keys and values): (tokens, H * D)."""
        decode, prefill, split, r = self.decode, self.prefill, self.count, self.runner
        if r.attention == "varlen" and (decode is None or decode.shared is None):
            out = varlen_attention.varlen_attention(q.contiguous(), r.keys[layer], r.values[layer], self.write_rows,
                                                    self.positions, r.scale)
            return out.reshape(out.shape[0], -1)
        if decode is not None and prefill is not None:
            return torch.cat([decode.attend(layer, q[:split]), prefill.attend(layer, q[split:], k[split:], v[split:])])
        if decode is not None:
            return decode.attend(layer, q)
        assert prefill is not None
        return prefill.attend(layer, q, k, v)

    def attend_last(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention for the decode rows and each segment's last token only."""
        assert self.prefill is not None
        attn = self.prefill.attend_last(layer, q[self.count:])
        if self.decode is not None:
            attn = torch.cat([self.decode.attend(layer, q[: self.count]), attn])
        return attn


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """Multi-query decode attention: q (B, H, D) over keys and values (B, W, D) with an additive mask
    (B, 1, 1, W). Every head attends to the one KV head, so the heads are the query rows of a single
    head: no copy of the keys per head. SDPA's kernels keep scores and softmax in float32."""
    out = F.scaled_dot_product_attention(q.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1), attn_mask=mask,
                                         scale=scale)
    return out.squeeze(1)


@dataclass(frozen=True)
class SharedPrefix:
    """Decode rows whose first `length` positions hold the same keys and values (copies of one prefix):
    they attend to that prefix together, read once from `source` (a row of the group)."""

    rows: list[int]
    source: int
    length: int


def attention_with_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q (B, L, D) over keys and values (B, S, D), with an optional additive bias
    (B, 1 or L, S), and the log-sum-exp of each query's scores (B, L, 1); float32.

    On a CPU in one fused kernel, SDPA's flash kernel, which returns the log-sum-exps too (scores in
    float32 whatever the inputs' dtype; 1.3x faster than the plain ops for decode rows sharing a
    1,024-token prefix); elsewhere in plain float32 ops.
    """
    fn = fused_attention_with_lse if q.device.type == "cpu" else plain_attention_with_lse
    return fn(q, keys, values, bias, scale)


def fused_attention_with_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.unsqueeze(1), keys.unsqueeze(1), values.unsqueeze(1),
        attn_mask=None if bias is None else bias.unsqueeze(1), scale=scale)
    return out.squeeze(1).float(), lse.squeeze(1).unsqueeze(-1)


def merge_by_lse(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The softmax attention over two disjoint sets of keys, from each set's (output, log-sum-exp)."""
    (out_a, lse_a), (out_b, lse_b) = first, second
    # the first set's share of the softmax mass, e^a / (e^a + e^b), is sigmoid(a - b)
    return torch.lerp(out_b, out_a, torch.sigmoid(lse_a - lse_b))


def plain_attention_with_lse(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, keys, values = q.float(), keys.float(), values.float()
    scores = q @ keys.transpose(1, 2) * scale
    if bias is not None:
        scores += bias.float()
    top = scores.amax(-1, keepdim=True)
    weights = (scores - top).exp_()
    total = weights.sum(-1, keepdim=True)
    return (weights @ values) / total, top + total.log()


def cascade_attention(q: torch.Tensor, shared_k: torch.Tensor, shared_v: torch.Tensor, own_k: torch.Tensor,
                      own_v: torch.Tensor, own_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention over a prefix shared by all rows and a part of each row's own, merged by their log-sum-exps:
    exactly the softmax over both; float32.

    q (G, M, D): M query vectors per row; shared_k/v (P, D): read once for all G x M queries (one matrix
    product instead of G passes over the same keys); own_k/v (G, W, D) with an additive bias (G, M or 1, W).
    """
    rows, queries, dim = q.shape
    shared_out, shared_lse = attention_with_lse(q.reshape(1, rows * queries, dim), shared_k[None], shared_v[None],
                                                None, scale)
    shared = shared_out.view(rows, queries, dim), shared_lse.view(rows, queries, 1)
    return merge_by_lse(shared, attention_with_lse(q, own_k, own_v, own_bias, scale))


class _DecodePlan:
    """One decode step of rows 0..count-1 from the runner's decode buffers: positions and mask, for all layers.

    Built from device values only (no host read), so it can be part of a captured CUDA graph (without a
    shared prefix: cascade attention is for the eager path).
    """

    def __init__(self, runner: FalconRunner, count: int, width: int, shared: SharedPrefix | None = None) -> None:
        self.runner, self.count, self.width = runner, count, width
        self.shared = shared
        if shared is not None:
            io = runner.io
            group = set(shared.rows)
            others = [row for row in range(count) if row not in group]
            # the whole batch shares it (rows 0..count-1): no gathering of rows, and no scattering back
            self.group = None if not others else io.upload(shared.rows, torch.long)
            self.others = io.upload(others, torch.long) if others else None
        self.ids = runner.tokens[:count]
        self.rows_index = runner._positions[:count]  # the decode rows' places in the flat batch: 0..count-1
        lengths = runner.lengths[:count]
        self.positions = lengths  # each row's new token goes after what it holds
        self.write_rows = runner.write_rows[:count]  # its own row, or the scratch row for padding
        mask = torch.zeros(count, 1, 1, width, dtype=runner.dtype, device=runner.device)
        self.mask = mask.masked_fill_(runner._positions[:width] > lengths[:, None, None, None], float("-inf"))

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The rows' queries (B, H, D) over their cache rows, which hold this layer's new keys and values."""
        r, heads, batch = self.runner, self.runner.num_heads, self.count
        keys = r.keys[layer, :batch, : self.width]  # (B, W, D): views, no copy
        values = r.values[layer, :batch, : self.width]
        if self.shared is None:
            return decode_attention(q, keys, values, self.mask, r.scale).reshape(batch, heads * r.head_dim)
        shared, group = self.shared, self.group
        own = slice(shared.length, self.width)
        parts = (q, keys[:, own], values[:, own], self.mask[:, 0, :, own])
        if group is not None:
            parts = tuple(t.index_select(0, group) for t in parts)
        joint = cascade_attention(
            parts[0].float(), r.keys[layer, shared.source, : shared.length].float(),
            r.values[layer, shared.source, : shared.length].float(), parts[1].float(), parts[2].float(),
            parts[3].float(), r.scale).to(q.dtype)
        if group is None:
            return joint.reshape(batch, heads * r.head_dim)
        out = torch.empty_like(q)
        out.index_copy_(0, group, joint)
        rest = self.others
        out.index_copy_(0, rest, decode_attention(q.index_select(0, rest), keys.index_select(0, rest),
                                                  values.index_select(0, rest), self.mask.index_select(0, rest),
                                                  r.scale))
        return out.reshape(batch, heads * r.head_dim)


class _PrefillPlan:
    """Prompt segments of some rows, as flat tokens (no padding between them): positions, where each token's
    key and value go, masks. Attention pads the segments to one width inside the call (only if their lengths
    differ): every other op of the step sees just the real tokens.

    Index lists are computed on the host and uploaded; nothing is read back.
    """

    def __init__(self, runner: FalconRunner, rows: Seq[int], chunks: Seq[Seq[int]], offsets: Seq[int]) -> None:
        self.runner = runner
        io = runner.io
        n, width_q = len(rows), max(len(c) for c in chunks)
        self.n, self.width_q = n, width_q
        sizes = [len(c) for c in chunks]
        self.count = sum(sizes)
        ends = [o + s for o, s in zip(offsets, sizes, strict=True)]
        ids: list[int] = []
        positions: list[int] = []
        write_rows: list[int] = []
        padded: list[int] = []  # each token's slot in the segments padded to one width
        for i, (row, chunk, start, end) in enumerate(zip(rows, chunks, offsets, ends, strict=True)):
            ids += chunk
            positions += range(start, end)
            write_rows += [row] * len(chunk)
            padded += range(i * width_q, i * width_q + len(chunk))
        # fresh prompts (nothing cached before them) attend only to themselves: causal attention over the
        # segment's own keys, SDPA's fast path; otherwise over the cache with an explicit mask
        self.fresh = all(o == 0 for o in offsets)
        self.ids = io.upload(ids, torch.long)
        pos = io.upload(positions, torch.long)
        self.positions = pos
        self.write_rows = io.upload(write_rows, torch.long)
        self.ragged = any(size != width_q for size in sizes)  # segments of different lengths: padded in attention
        self.padded_index = io.upload(padded, torch.long) if self.ragged else None
        self.last_index = io.upload(list(itertools.accumulate(sizes, initial=-1))[1:], torch.long)
        self.row_index = io.upload(list(rows), torch.long)
        self.width_k = max(ends)
        # On a CPU, segments that all continue after cached tokens attend in two parts merged by their
        # log-sum-exps: the cached tokens, which every query of a row sees (no mask unless the rows cache
        # different lengths: SDPA's flash kernel then runs unmasked, with the heads as the query rows of the
        # one KV head), and the segment itself, causally. For one request's 75 tokens after 1,024 cached ones:
        # 1.28 against 1.60 ms a layer alone, 2-3% of a step that also decodes 15 rows.
        self.cached = max(offsets) if runner.device.type == "cpu" and min(offsets) > 0 else 0
        # the ends, on the device, only for the masks that need them: the last tokens' mask over rows of
        # different lengths, and `allowed` (segments that attend over the cache in one pass)
        masked = not self.fresh and not self.cached
        ragged_ends = min(ends) != self.width_k  # rows of different lengths
        ends_t = io.upload(ends, torch.long) if ragged_ends or masked else None
        key_pos = runner._positions[: self.width_k]
        # the last tokens' attention (last layer) over rows of different lengths: each row's own positions only
        self.last_mask: torch.Tensor | None = None
        if ragged_ends:
            mask = torch.zeros(n, 1, 1, self.width_k, dtype=runner.dtype, device=runner.device)
            self.last_mask = mask.masked_fill_(key_pos >= ends_t[:, None, None, None], float("-inf"))
        self.allowed: torch.Tensor | None = None
        if self.cached:
            self.cached_bias = None
            if min(offsets) != self.cached:
                pad = [[0.0] * o + [float("-inf")] * (self.cached - o) for o in offsets]
                self.cached_bias = torch.tensor(pad, dtype=runner.dtype).view(n, 1, self.cached)
        elif masked:
            # padded query slots get position -1 here: they see nothing, and their outputs are never used
            slot_pos = torch.full((n * width_q,), -1, dtype=torch.long, device=runner.device)
            slot_pos = slot_pos.index_copy_(0, self.padded_index, pos) if self.ragged else pos
            slot_pos = slot_pos.view(n, width_q)
            seen = key_pos[None, None, :] <= slot_pos[:, :, None]
            self.allowed = (seen & (key_pos[None, None, :] < ends_t[:, None, None])).unsqueeze(1)  # (n, 1, Sq, Sk)

    def _segments(self, x: torch.Tensor) -> torch.Tensor:
        """Flat tokens (T, ...) as the segments padded to one width: (n, width_q, ...)."""
        if self.ragged:
            assert self.padded_index is not None
            x = x.new_zeros(self.n * self.width_q, *x.shape[1:]).index_copy_(0, self.padded_index, x)
        return x.view(self.n, self.width_q, *x.shape[1:])

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """The segments padded to one width (n * width_q, ...) back as flat tokens (T, ...)."""
        return x.index_select(0, self.padded_index) if self.ragged else x  # type: ignore[arg-type]

    def pick_last(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """Of `x` (split decode rows, then the segments' tokens), the decode rows and each segment's last token."""
        last = x[split:].index_select(0, self.last_index)
        return torch.cat([x[:split], last]) if split else last

    def attend_last(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention for each segment's last token only, over its row's whole context (the cache now holds it):
        (n, H * D)."""
        r, heads, n = self.runner, self.runner.num_heads, self.n
        last_q = q.index_select(0, self.last_index)
        keys = r.keys[layer, :, : self.width_k].index_select(0, self.row_index)
        values = r.values[layer, :, : self.width_k].index_select(0, self.row_index)
        return decode_attention(last_q, keys, values, self.last_mask, r.scale).reshape(n, heads * r.head_dim)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The segments' tokens' attention: q (T, H, D), their own keys and values k, v (T, D), already in the
        cache; returns (T, H * D)."""
        r, heads, n, width_q = self.runner, self.runner.num_heads, self.n, self.width_q
        q = self._segments(q).transpose(1, 2)  # (n, H, Sq, D)
        if self.fresh:
            k, v = self._segments(k).unsqueeze(1), self._segments(v).unsqueeze(1)  # (n, 1, Sq, D)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=r.scale, enable_gqa=True)
        elif self.cached:
            attn = self._after_cached(layer, q, self._segments(k).unsqueeze(1), self._segments(v).unsqueeze(1))
        else:
            keys = r.keys[layer, :, : self.width_k].index_select(0, self.row_index).unsqueeze(1)
            values = r.values[layer, :, : self.width_k].index_select(0, self.row_index).unsqueeze(1)
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.allowed, scale=r.scale,
                                                  enable_gqa=True)
        return self._flat(attn.transpose(1, 2).reshape(n * width_q, heads * r.head_dim))

    def _after_cached(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of segments that continue after cached tokens, in the two parts (CPU): q (n, H, Sq, D),
        the segments' own keys and values (n, 1, Sq, D); returns (n, H, Sq, D)."""
        r, n, heads, width_q, dim = self.runner, self.n, self.runner.num_heads, self.width_q, self.runner.head_dim
        keys = r.keys[layer, :, : self.cached].index_select(0, self.row_index)
        values = r.values[layer, :, : self.cached].index_select(0, self.row_index)
        cached = fused_attention_with_lse(q.reshape(n, heads * width_q, dim), keys, values, self.cached_bias, r.scale)
        own, own_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k.expand(n, heads, width_q, dim), v.expand(n, heads, width_q, dim), is_causal=True, scale=r.scale)
        own_part = own.float().reshape(n, heads * width_q, dim), own_lse.reshape(n, heads * width_q, 1)
        return merge_by_lse(cached, own_part).to(q.dtype).view(n, heads, width_q, dim)
