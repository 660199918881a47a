"""Constrained decoding: the sampler picks only tokens that a grammar allows (a JSON schema, any JSON
object, a regular expression, a choice of strings, a Lark grammar), so the reply always parses.

The grammar engine is llguidance. Chosen over xgrammar and outlines-core on this project's
measurements (2026-11-28, Falcon-7B's 65,024-token vocabulary, CPU): it produced a valid instance
for every bounded schema of the coverage set (xgrammar broke `anyOf` with `null` and ignored `allOf`),
it needs no compile step worth the name (5 ms for a 10-field schema, xgrammar 314 ms), and it is a
3 MB wheel with no dependencies (xgrammar requires triton). Its mask costs more per token (41 us
median, xgrammar 3 us), well under a decode step.

A spec is compiled once (`GrammarCompiler.compile`, cached, thread-safe) into a matcher template; each
sequence gets a copy and advances it with every token it accepts. The sampler fills the masks of the
constrained rows only. A new spec is first checked against cheap bounds, then compiled in the sandbox
(`grammar_sandbox.py`: a child process with a memory cap and a deadline), and only then here: no grammar
can crash, exhaust or stall the server. Compiles run on the compiler's own threads (`compile_async`), never
on the event loop's default pool, which tokenizing uses.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future

import torch

from .grammar_sandbox import STACK_BYTES, CompileSandbox
from .grammar_source import GrammarLimits, GrammarSpec, UnsupportedGrammar, build_matcher, check_bounds

__all__ = ["Grammar", "GrammarCompiler", "GrammarLimits", "GrammarMatcher", "GrammarSpec", "UnsupportedGrammar",
           "allowed_tokens", "fill_masks"]


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher) -> None:
        self._matcher = matcher

    def accept(self, token: int) -> bool:
        return self._matcher.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but the end may follow."""
        return self._matcher.is_stopped()


class Grammar:
    """A compiled grammar: a matcher in its start state, copied for each sequence."""

    def __init__(self, spec: GrammarSpec, template) -> None:
        self.spec = spec
        self._template = template

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy())


class _CompileThreads:
    """The compiler's own worker threads (stacks of the sandbox's size): compiles wait here, not on the pool
    that the event loop's `to_thread` shares with tokenizing."""

    def __init__(self, count: int) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        previous = threading.stack_size(STACK_BYTES)
        try:
            for i in range(count):
                threading.Thread(target=self._work, name=f"grammar-compile-{i}", daemon=True).start()
        finally:
            threading.stack_size(previous)

    def _work(self) -> None:
        while True:
            future, fn, args = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the caller
                    future.set_exception(exc)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future


class GrammarCompiler:
    """Compiles specs for one tokenizer within `limits`; the last `cache_size` compiled grammars are kept.

    `workers` sandboxes (and threads) compile at once: one slow grammar does not hold up the others.
    """

    def __init__(self, tokenizer, limits: GrammarLimits | None = None, cache_size: int = 256, workers: int = 2) -> None:
        self._hf_tokenizer = tokenizer
        self.limits = limits or GrammarLimits()
        self._tokenizer = None  # llguidance's view of it: built at the first compile (0.7 s for 65k tokens)
        self._cache: OrderedDict[GrammarSpec, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._workers = workers
        self._sandboxes: queue.SimpleQueue[CompileSandbox] | None = None
        self._all_sandboxes: list[CompileSandbox] = []
        self._threads: _CompileThreads | None = None

    @property
    def vocab_size(self) -> int:
        return len(self._hf_tokenizer)

    def _llg_tokenizer(self):
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer)
        return self._tokenizer

    def _sandbox_pool(self) -> queue.SimpleQueue[CompileSandbox]:
        with self._lock:
            if self._sandboxes is None:
                backend = self._hf_tokenizer.backend_tokenizer
                text = backend.to_str()
                self._sandboxes = queue.SimpleQueue()
                for _ in range(self._workers):
                    box = CompileSandbox(text, len(self._hf_tokenizer), self._hf_tokenizer.eos_token_id, self.limits)
                    self._all_sandboxes.append(box)
                    self._sandboxes.put(box)
            return self._sandboxes

    def start(self) -> None:
        """Start the sandboxes and build the tokenizer now, so that the first constrained request does not wait."""
        self._llg_tokenizer()
        self._sandbox_pool()
        for box in self._all_sandboxes:
            box.start()

    def cached(self, spec: GrammarSpec) -> Grammar | None:
        with self._lock:
            grammar = self._cache.get(spec)
            if grammar is not None:
                self._cache.move_to_end(spec)
            return grammar

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The grammar of `spec`, from the cache or compiled now (first in a sandbox); raises `UnsupportedGrammar`
        saying why not. Blocks: call it off the event loop (`compile_async`)."""
        cached = self.cached(spec)
        if cached is not None:
            return cached
        check_bounds(spec, self.limits)
        pool = self._sandbox_pool()
        box = pool.get()
        try:
            box.check(spec)
        finally:
            pool.put(box)
        tokenizer = self._llg_tokenizer()
        if threading.current_thread().name.startswith("grammar-compile"):
            template = build_matcher(spec, tokenizer, self.limits)
        else:  # on a stack of the size the sandbox compiled it with
            from .grammar_sandbox import on_big_stack

            template = on_big_stack(build_matcher, spec, tokenizer, self.limits)
        grammar = Grammar(spec, template)
        with self._lock:
            self._cache[spec] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    async def compile_async(self, spec: GrammarSpec) -> Grammar:
        """`compile` on the compiler's own threads; the event loop answers meanwhile."""
        cached = self.cached(spec)
        if cached is not None:
            return cached
        with self._lock:
            if self._threads is None:
                self._threads = _CompileThreads(self._workers)
            threads = self._threads
        return await asyncio.wrap_future(threads.submit(self.compile, spec))

    def close(self) -> None:
        """Stop the sandboxes' processes."""
        for box in self._all_sandboxes:
            box.close()


_executor = None  # llguidance's thread pool for filling several masks at once (native threads, no GIL)
PARALLEL_MIN_CORES = 8  # below, the pool's threads take cores from the forward pass (measured on 2 cores)


def fill_masks(matchers: list[GrammarMatcher], bitmask: torch.Tensor) -> None:
    """Fill row i of a contiguous int32 host bitmask (len(matchers), ceil(vocab / 32)) with the tokens
    matcher i allows next; in parallel on a machine with cores to spare.

    (Not through `llguidance.torch`: importing it runs `torch.compile` at import time, which loads
    inductor, a second and more on the engine thread at the first constrained request.)
    """
    global _executor
    assert bitmask.dtype == torch.int32 and bitmask.device.type == "cpu" and bitmask.is_contiguous()
    assert bitmask.shape[0] == len(matchers)
    row_bytes = bitmask.shape[1] * bitmask.element_size()
    if len(matchers) == 1 or (os.cpu_count() or 1) < PARALLEL_MIN_CORES:
        for i, m in enumerate(matchers):
            m._matcher.unsafe_compute_mask_ptr(bitmask.data_ptr() + i * row_bytes, row_bytes)
        return
    if _executor is None:
        from llguidance import LLExecutor

        _executor = LLExecutor()
    _executor.unsafe_compute_mask_ptr([(m._matcher, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                      row_bytes, len(matchers))


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """An int32 bitmask (rows, ceil(vocab / 32)) unpacked into booleans (rows, vocab), on its device."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.bool().reshape(bitmask.shape[0], -1)[:, :vocab]
