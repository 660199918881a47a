"""Decode steps captured as CUDA graphs, one per (batch size, attention width) bucket, and replayed.

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

from .falcon import FalconRunner

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


def bucket(value: int, buckets: list[int]) -> int | None:
    return next((b for b in buckets if b >= value), None)


class DecodeGraphs:
    """Captured decode steps of a runner; `decode(count, width)` has the signature of `runner.decode`.

    `capture` turns a step's function into what replays it: a CUDA graph by default; tests on a CPU
    pass one that replays by calling the function, so the buckets, padding and output buffer run
    exactly as around a graph.
    """

    def __init__(self, runner: FalconRunner, capture: Capture | None = None) -> None:
        if capture is None:
            if runner.device.type != "cuda":
                raise ValueError("CUDA graphs need a CUDA device")
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=runner.device)
            capture = self._cuda_graph
        self._capture_step = capture
        self.runner = runner
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
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)
        seconds = time.perf_counter() - start
        log.info("captured %d decode graphs (%d batch sizes x %d widths) in %.1f s", len(self._graphs),
                 len(self.batch_buckets), len(self.width_buckets), seconds)
        return seconds

    def _capture(self, rows: int, width: int) -> None:
        def step() -> None:
            self.out[:rows].copy_(self.runner.decode(rows, width))

        self._graphs[(rows, width)] = self._capture_step(step)

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

    def decode(self, count: int, width: int) -> torch.Tensor:
        """Logits of a decode step of rows 0..count-1 (a view of the output buffer, valid until the next step)."""
        rows, bucket_width = bucket(count, self.batch_buckets), bucket(width, self.width_buckets)
        if rows is None or bucket_width is None:
            return self.runner.decode(count, width)
        if (rows, bucket_width) not in self._graphs:
            self._capture(rows, bucket_width)
        self._graphs[(rows, bucket_width)]()
        return self.out[:count]
