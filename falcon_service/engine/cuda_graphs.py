"""Steps captured as CUDA graphs and replayed: pure decode steps whole, one graph per (batch size, attention
width) bucket (`DecodeGraphs`); steps that prefill, mixed with decode rows or not, in pieces between the
attention calls, one set per token-count bucket (`StepGraphs`).

A decode step of Falcon-7B launches several hundred small kernels; launched one by one from
Python they cost more host time than the GPU needs to run them at small batch sizes. Captured
once and replayed, the whole step is one launch. The graphs read the runner's fixed decode
buffers (tokens, lengths, write rows), and write their logits into one fixed output buffer.
A step of B rows at attention width W replays the smallest captured graph of at least B rows
and at least W positions: the padding rows write only to the scratch row, and attention reads
no more of the cache than the width bucket holds.

A bucket is captured the first time a step needs it (or all of them at start, `capture_all`),
into one shared memory pool. Capturing runs the step eagerly twice first (library handles, kernel
choices): those runs compute exactly what the step then computes, writing the same keys and
values to the same slots, so a capture in the middle of serving changes no result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from .falcon import FalconRunner, StepBatch

log = logging.getLogger(__name__)

Step = Callable[[], None]
Capture = Callable[[Step], Step]  # a step's function -> what replays it


def batch_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, and `max_rows` itself."""
    sizes = [b for b in (1, 2, 4) if b < max_rows] + list(range(8, max_rows, 8)) + [max_rows]
    return sorted(set(sizes))


def width_buckets(max_len: int, smallest: int = 128) -> list[int]:
    """Powers of two from `smallest`, and `max_len` itself."""
    widths, w = [], smallest
    while w < max_len:
        widths.append(w)
        w *= 2
    return [*widths, max_len]


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts of a step's flat batch: 1, 2, 4, 8, then steps of 8 to 128, of 16 to 256, of 32 to 512, and
    so on (at most 7 padding tokens, or one in eight), and `max_tokens` itself."""
    sizes, size = [1, 2, 4], 8
    while size < max_tokens:
        sizes.append(size)
        size += max(8, 1 << (size.bit_length() - 4))
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens})


def bucket(value: int, buckets: list[int]) -> int | None:
    return next((b for b in buckets if b >= value), None)


class _Graphs:
    """Steps captured as CUDA graphs into one memory pool, on a side stream; `capture` (tests on a CPU) stands in
    for the capture: it turns a step's function into what replays it."""

    def __init__(self, runner: FalconRunner, capture: Capture | None) -> None:
        if capture is None:
            if runner.device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=runner.device)
            capture = self._cuda_graph
        self._capture_step = capture
        self.runner = runner

    def _cuda_graph(self, step: Step) -> Step:
        device = self.runner.device
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):
            for _ in range(2):  # warm-up: library handles, kernel choices (see the module's docstring)
                step()
        torch.cuda.current_stream(device).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            step()
        return graph.replay

    def _synchronize(self) -> None:
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)


class DecodeGraphs(_Graphs):
    """Captured decode steps of a runner; `decode(count, width)` has the signature of `runner.decode`.

    `capture` turns a step's function into what replays it: a CUDA graph by default; tests on a CPU
    pass one that replays by calling the function, so the buckets, padding and output buffer run
    exactly as around a graph.
    """

    def __init__(self, runner: FalconRunner, capture: Capture | None = None) -> None:
        super().__init__(runner, capture)
        self.batch_buckets = batch_buckets(runner.batch_rows)
        self.width_buckets = width_buckets(runner.max_len)
        self.out = torch.zeros(runner.batch_rows, runner.vocab_size, dtype=runner.dtype, device=runner.device)
        self._graphs: dict[tuple[int, int], Step] = {}

    @property
    def buckets(self) -> set[tuple[int, int]]:
        """The (rows, width) buckets captured so far."""
        return set(self._graphs)

    def capture_all(self) -> float:
        """Capture every bucket not captured yet, largest first (the smaller ones reuse its memory); seconds."""
        start = time.perf_counter()
        for rows in reversed(self.batch_buckets):
            for width in reversed(self.width_buckets):
                if (rows, width) not in self._graphs:
                    self._capture(rows, width)
        self._synchronize()
        seconds = time.perf_counter() - start
        log.info("captured %d decode graphs (%d batch sizes x %d widths) in %.1f s", len(self._graphs),
                 len(self.batch_buckets), len(self.width_buckets), seconds)
        return seconds

    def _capture(self, rows: int, width: int) -> None:
        def step() -> None:
            self.out[:rows].copy_(self.runner.decode(rows, width))

        self._graphs[(rows, width)] = self._capture_step(step)

    def decode(self, count: int, width: int) -> torch.Tensor:
        """Logits of a decode step of rows 0..count-1 (a view of the output buffer, valid until the next step)."""
        rows, bucket_width = bucket(count, self.batch_buckets), bucket(width, self.width_buckets)
        if rows is None or bucket_width is None:
            return self.runner.decode(count, width)
        if (rows, bucket_width) not in self._graphs:
            self._capture(rows, bucket_width)
        self._graphs[(rows, bucket_width)]()
        return self.out[:count]


class StepGraphs(_Graphs):
    """Steps that prefill, replayed by token-count bucket: everything between two attention calls (the MLP, the
    residuals, the next layer norm, the projections, rotary positions, the writes of keys and values) captured once per
    bucket as a piece; the attention calls, whose shapes follow the step's prompts, run between the pieces as
    they come.

    A step of T tokens runs the pieces of the smallest bucket of at least T: its tokens, positions and rows are
    copied into fixed buffers; the padding tokens after them go to position 0 of the scratch row (where they
    write their keys and values, touching no real row), never through attention, and their outputs are never
    read. `capture` as in `DecodeGraphs`.
    """

    def __init__(self, runner: FalconRunner, max_tokens: int, capture: Capture | None = None) -> None:
        super().__init__(runner, capture)
        self.buckets = token_buckets(max_tokens)
        size, heads, dim = max_tokens, runner.num_heads, runner.head_dim
        new = {"dtype": runner.dtype, "device": runner.device}
        index = {"dtype": torch.long, "device": runner.device}
        self.ids = torch.zeros(size, **index)
        self.positions = torch.zeros(size, **index)
        self.rows = torch.full((size,), runner.cache.scratch_row, **index)
        self.x = torch.zeros(size, runner.hidden, **new)
        self.h = torch.zeros(size, runner.hidden, **new)
        self.cos = torch.zeros(size, 1, dim, **new)
        self.signed_sin = torch.zeros(size, 1, dim, **new)
        self.q = torch.zeros(size, heads, dim, **new)
        self.k = torch.zeros(size, dim, **new)
        self.v = torch.zeros(size, dim, **new)
        self.attn = torch.zeros(size, heads * dim, **new)
        self._pieces: dict[int, list[Step]] = {}

    @property
    def captured(self) -> set[int]:
        """The token buckets captured so far."""
        return set(self._pieces)

    def capture_all(self) -> float:
        """Capture every bucket not captured yet, largest first; seconds."""
        start = time.perf_counter()
        for tokens in reversed(self.buckets):
            if tokens not in self._pieces:
                self._capture(tokens)
        self._synchronize()
        seconds = time.perf_counter() - start
        log.info("captured the pieces of steps of %d token counts in %.1f s", len(self._pieces), seconds)
        return seconds

    def _capture(self, tokens: int) -> None:
        runner, layers = self.runner, len(self.runner.layers)
        x, h, attn = self.x[:tokens], self.h[:tokens], self.attn[:tokens]
        q, k, v = self.q[:tokens], self.k[:tokens], self.v[:tokens]
        cos, signed_sin = self.cos[:tokens], self.signed_sin[:tokens]
        positions, rows = self.positions[:tokens], self.rows[:tokens]

        def project(layer: int) -> None:  # the layer's normed input projected, positioned, its keys written
            got = runner.rotate_and_write(layer, runner.qkv(layer, h), cos, signed_sin, rows, positions)
            for buffer, value in zip((q, k, v), got, strict=True):
                buffer.copy_(value)

        def first() -> None:
            x.copy_(torch.nn.functional.embedding(self.ids[:tokens], runner.embed))
            cos.copy_(runner.cos[positions].unsqueeze(1))
            signed_sin.copy_(runner.signed_sin[positions].unsqueeze(1))
            h.copy_(runner.norm(0, x))
            project(0)

        def between(layer: int) -> Step:  # after the attention of `layer`, up to the next one's
            def piece() -> None:
                out, normed = runner.post_attention(layer, x, h, attn)
                x.copy_(out)
                if normed is not None:
                    h.copy_(normed)
                    project(layer + 1)
            return piece

        self._pieces[tokens] = [self._capture_step(first)] + [self._capture_step(between(i)) for i in range(layers)]

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """What `runner.forward(batch)` returns: the logits of the decode rows, then of each segment's last token."""
        tokens = batch.tokens
        size = bucket(tokens, self.buckets)
        if size is None:
            return self.runner.forward(batch)
        if size not in self._pieces:
            self._capture(size)
        pieces = self._pieces[size]
        self.ids[:tokens].copy_(batch.ids)
        self.positions[:tokens].copy_(batch.positions)
        self.rows[:tokens].copy_(batch.write_rows)
        self.positions[tokens:size].zero_()  # padding: position 0 of the scratch row
        self.rows[tokens:size].fill_(self.runner.cache.scratch_row)
        pieces[0]()
        for layer in range(len(self.runner.layers)):
            self.attn[:tokens].copy_(batch.attend(layer, self.q[:tokens], self.k[:tokens], self.v[:tokens]))
            pieces[layer + 1]()
        return self.runner.logits(self.x[:tokens].index_select(0, batch.logit_rows()))
