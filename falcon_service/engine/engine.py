"""The async face of generation: submit a request, iterate its events, abort it.

One thread owns the model and runs the step loop; asyncio callers never block on torch.
Requests go in through the scheduler's thread-safe queue; events come back to each
caller's event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .batch import RunningBatch
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .falcon import FalconRunner
from .sampling import SamplingParams, SamplingState, TokenLogprob, sample
from .scheduler import BatchLimits, BatchLoad, Demand, QueueFullError, Scheduler

__all__ = [
    "ChoiceEvent", "Engine", "EngineError", "EngineObserver", "GenerationRequest", "QueueFullError", "RequestRecord",
    "RequestStream", "SamplingParams", "TokenLogprob",
]

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """Generation failed inside the engine (the request gets a 500)."""


@dataclass(frozen=True)
class RequestRecord:
    """What one finished request cost and how it went, for metrics and logs."""

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None  # seconds from submit to the first token
    time_per_output_token: float | None  # seconds per token after the first (longest choice)
    finish_reason: str  # stop | length | abort | error


class EngineObserver(Protocol):
    """Receives the engine's measurements (metrics); called on the engine thread, so it must be quick."""

    def on_step(self, waiting: int, running: int, cache_tokens: int) -> None: ...

    def on_request_done(self, record: RequestRecord) -> None: ...

    def on_rejected(self) -> None: ...


@dataclass(frozen=True)
class GenerationRequest:
    """One request: a tokenised prompt, `n` choices, and how to sample them."""

    prompt_ids: tuple[int, ...]
    params: SamplingParams
    n: int = 1
    request_id: str = ""


@dataclass
class ChoiceEvent:
    """New output of one choice: text delta, the tokens behind it, and the finish reason once done."""

    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class RequestStream:
    """The caller's handle on a submitted request: an async iterator of `ChoiceEvent`s."""

    def __init__(self, engine: Engine, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.prompt_tokens = len(request.prompt_ids)
        self.completion_tokens = 0
        self.finish_reasons: dict[int, str] = {}
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[list[ChoiceEvent] | BaseException] = asyncio.Queue()
        self._open = request.n
        # engine-thread side: which choices ended how, and tokens made
        self._ended: dict[int, str] = {}
        self._generated: dict[int, int] = {}

    @property
    def finished(self) -> bool:
        return self._open == 0

    def abort(self) -> None:
        """Stop generating for this request; its sequences leave the batch at the next step."""
        if not self.finished:
            self._engine._abort(self)

    def __aiter__(self) -> AsyncIterator[ChoiceEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[ChoiceEvent]:
        while self._open:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._open = 0
                raise item
            for event in item:
                self.completion_tokens += len(event.token_ids)
                if event.finish_reason is not None:
                    self.finish_reasons[event.index] = event.finish_reason
                    self._open -= 1
                yield event

    # engine thread -> caller's loop
    def _deliver(self, item: list[ChoiceEvent] | BaseException, outbox: Outbox | None = None) -> None:
        """Send events to the caller, or into `outbox` to be sent with others in one hand-over."""
        self._account(item)
        if outbox is None:
            send({self._loop: [(self._queue, item)]})
        else:
            outbox.setdefault(self._loop, []).append((self._queue, item))

    def _account(self, item: list[ChoiceEvent] | BaseException) -> None:
        """Engine-side bookkeeping; reports the request's record once its last choice has ended."""
        now = time.monotonic()
        record = None
        if isinstance(item, BaseException):
            if len(self._ended) < self.request.n:
                self._ended.update({i: "error" for i in range(self.request.n)})
                record = self._record(now)
        else:
            if self.first_token_at is None and any(e.token_ids for e in item):
                self.first_token_at = now
            for event in item:
                self._generated[event.index] = self._generated.get(event.index, 0) + len(event.token_ids)
                if event.finish_reason is not None:
                    self._ended[event.index] = event.finish_reason
                    if len(self._ended) == self.request.n:
                        record = self._record(now)
        # measured before the caller hears of the end, so metrics are never behind what a client saw
        if record is not None and self._engine.observer is not None:
            self._engine.observer.on_request_done(record)

    def _record(self, now: float) -> RequestRecord:
        reasons = set(self._ended.values())
        reason = next((r for r in ("error", "abort", "length") if r in reasons), "stop")
        longest = max(self._generated.values(), default=0)
        ttft = tpot = None
        if self.first_token_at is not None:
            ttft = self.first_token_at - self.submitted_at
            if longest > 1:
                tpot = (now - self.first_token_at) / (longest - 1)
        return RequestRecord(self.prompt_tokens, sum(self._generated.values()), ttft, tpot, reason)


Outbox = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, "list[ChoiceEvent] | BaseException"]]]


def _put_all(items: list[tuple[asyncio.Queue, list[ChoiceEvent] | BaseException]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def send(outbox: Outbox) -> None:
    """Hand a step's events to their event loops: one wake-up per loop, not one per request."""
    for loop, items in outbox.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            loop.call_soon_threadsafe(_put_all, items)


class _Sequence:
    """One choice of one request, as the engine thread tracks it."""

    def __init__(self, stream: RequestStream, index: int, tokenizer: PreTrainedTokenizerBase, vocab: int) -> None:
        request = stream.request
        self.stream = stream
        self.index = index
        self.params = request.params
        self.output_ids: list[int] = []
        self.detokenizer = IncrementalDetokenizer(tokenizer, list(request.prompt_ids))
        self.stops = StopMatcher(list(self.params.stop))
        seed = None if self.params.seed is None else (self.params.seed * 1_000_003 + index) % 2**63
        self.sampling = SamplingState(self.params, request.prompt_ids, vocab, seed)
        self.finish_reason: str | None = None

    @property
    def remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    def accept(self, token: int, logprob: TokenLogprob | None, eos: int | None, max_len: int) -> ChoiceEvent:
        """Take the sampled token; return what the client sees, with the finish reason if it ends here."""
        self.output_ids.append(token)
        is_eos = token == eos and not self.params.ignore_eos
        text, hit = self.stops.feed("" if is_eos else self.detokenizer.add(token))
        if hit:
            self.finish_reason = "stop"
        elif is_eos or self.remaining <= 0 or len(self.stream.request.prompt_ids) + len(self.output_ids) >= max_len:
            tail, hit = self.stops.feed(self.detokenizer.flush())
            text += tail if hit else tail + self.stops.flush()
            self.finish_reason = "stop" if is_eos or hit else "length"
        return ChoiceEvent(self.index, text, [token], [logprob] if logprob else [], self.finish_reason)


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """Bytes of KV cache one token takes across all layers (Falcon-7B, bf16: 8 KiB)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if getattr(cfg, "new_decoder_architecture", False):
        kv_heads = cfg.num_kv_heads
    elif getattr(cfg, "multi_query", False):
        kv_heads = 1
    else:
        kv_heads = cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize


RunnerFactory = Callable[[PreTrainedModel, int, int], FalconRunner]


class Engine:
    """Iteration-level batching: new requests join at the next step, finished ones leave at once."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, limits: BatchLimits,
        observer: EngineObserver | None = None, runner_factory: RunnerFactory = FalconRunner,
        threads: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.threads = threads
        self.observer = observer
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = model.config.vocab_size
        # every row of the KV cache can hold a whole context: the token budget decides the rows
        rows = max(1, min(limits.max_batch_size, limits.max_batch_tokens // self.max_model_len))
        self.limits = replace(limits, max_batch_size=rows)
        self.scheduler: Scheduler[RequestStream] = Scheduler(self.limits)
        self._runner = runner_factory(self.model, rows + 1, self.max_model_len)  # + the staging row
        self._batch = RunningBatch(self._runner)
        self._sequences: list[_Sequence] = []
        self._staged: RequestStream | None = None  # a long prompt being prefilled a chunk per step
        self._staged_done = 0
        self._next_tokens: list[int] = []
        self._aborted: set[RequestStream] = set()
        self._wake = threading.Condition()
        self._stopping = False
        self._fallback = torch.Generator().manual_seed(torch.seed())
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="falcon-engine", daemon=True)
        self._thread.start()

    # ---- caller side (any event loop) ----

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request and return its stream; raises `QueueFullError` when the queue is full."""
        if not request.prompt_ids:
            raise ValueError("the prompt is empty")
        if len(request.prompt_ids) + request.params.max_tokens > self.max_model_len:
            raise ValueError("prompt plus max_tokens exceeds the model's context length")
        if request.n > self.limits.max_batch_size:
            raise ValueError(f"n={request.n} is more than the {self.limits.max_batch_size} sequences "
                             "this server decodes at once")
        stream = RequestStream(self, request, asyncio.get_running_loop())
        demand = Demand(request.n, len(request.prompt_ids))
        with self._wake:
            try:
                self.scheduler.add(stream, demand)
            except QueueFullError:
                if self.observer is not None:
                    self.observer.on_rejected()
                raise
            self._wake.notify()
        return stream

    def _abort(self, stream: RequestStream) -> None:
        with self._wake:
            self._aborted.add(stream)
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        """Point-in-time counts for metrics and health checks."""
        return {
            "waiting": self.scheduler.num_waiting,
            "running": len(self._sequences),
            "cache_tokens": self._batch.cache_tokens,
        }

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    # ---- engine thread ----

    def _run(self) -> None:
        if self.threads:
            # OpenMP teams belong to the thread that starts them: the step loop's team is this thread's
            torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                while not (self._stopping or self._aborted or self._sequences or self._staged
                           or self.scheduler.num_waiting):
                    self._wake.wait()
                if self._stopping:
                    break
                aborted, self._aborted = self._aborted, set()
            admitted: list[RequestStream] = []
            try:
                self._drop_aborted(aborted)
                if self._staged is None:
                    admitted = self.scheduler.admit(self._load())
                    prefill = sum(len(s.request.prompt_ids) for s in admitted)
                    if len(admitted) == 1 and prefill > self.limits.max_prefill_tokens:
                        self._staged, self._staged_done, admitted = admitted[0], 0, []
                # one pass over the weights: new prompts (at most max_prefill_tokens) ride along with
                # the decode step; a long prompt's chunk is its own pass, then the batch decodes
                if self._staged is not None:
                    self._prefill_chunk()
                    if self._sequences:
                        self._decode()
                elif admitted and self._sequences:
                    self._decode_and_prefill(admitted)
                elif admitted:
                    self._prefill(admitted)
                elif self._sequences:
                    self._decode()
            except Exception as exc:  # a failing step must not take the server down
                log.exception("generation step failed")
                self._fail_all(EngineError(f"generation failed: {exc}"), admitted_too=admitted)
            if self.observer is not None:
                stats = self.stats()
                self.observer.on_step(stats["waiting"], stats["running"], stats["cache_tokens"])
        self._fail_all(EngineError("the engine is shutting down"))

    def _load(self) -> BatchLoad:
        return BatchLoad(rows=len(self._sequences) + (self._staged.request.n if self._staged else 0))

    def _drop_aborted(self, aborted: set[RequestStream]) -> None:
        if not aborted:
            return
        unstarted = self.scheduler.remove(lambda s: s in aborted)
        if self._staged in aborted:
            unstarted.append(self._staged)
            self._staged = None
        for stream in unstarted:
            stream._deliver([ChoiceEvent(i, "", finish_reason="abort") for i in range(stream.request.n)])
        gone = [s for s in self._sequences if s.stream in aborted]
        for seq in gone:
            seq.stream._deliver([ChoiceEvent(seq.index, "", finish_reason="abort")])
        if gone:
            self._remove([i for i, s in enumerate(self._sequences) if s.stream in aborted])

    def _remove(self, rows: list[int]) -> None:
        """Take these rows out of the batch, freeing their cache rows for new requests."""
        order = self._batch.remove(rows)
        self._sequences = [self._sequences[i] for i in order]
        self._next_tokens = [self._next_tokens[i] for i in order]

    def _prefill(self, streams: list[RequestStream]) -> None:
        prompts = [s.request.prompt_ids for s in streams]
        logits = self._batch.add(prompts, [s.request.n for s in streams])
        added = self._join(streams)
        self._accept(logits, first_row=len(self._sequences) - added)

    def _decode_and_prefill(self, streams: list[RequestStream]) -> None:
        prompts = [s.request.prompt_ids for s in streams]
        decoded, prefilled = self._batch.step_and_add(self._next_tokens, prompts, [s.request.n for s in streams])
        self._join(streams)
        self._accept(torch.cat([decoded, prefilled]), first_row=0)

    def _join(self, streams: list[RequestStream]) -> int:
        """Track the choices of newly prefilled requests (rows at the end); returns how many."""
        new = [_Sequence(s, i, self.tokenizer, self.vocab_size) for s in streams for i in range(s.request.n)]
        self._sequences += new
        self._next_tokens += [0] * len(new)
        return len(new)

    def _prefill_chunk(self) -> None:
        """Prefill the next chunk of the staged prompt; once it is whole, its choices join the batch."""
        stream = self._staged
        assert stream is not None
        prompt, start = stream.request.prompt_ids, self._staged_done
        logits = self._batch.stage(prompt[start : start + self.limits.max_prefill_tokens], start)
        self._staged_done = min(len(prompt), start + self.limits.max_prefill_tokens)
        if self._staged_done < len(prompt):
            return
        n = stream.request.n
        self._batch.adopt_staged(len(prompt), n)
        self._staged = None
        self._join([stream])
        self._accept(logits.expand(n, -1), first_row=len(self._sequences) - n)

    def _decode(self) -> None:
        logits = self._batch.step(self._next_tokens)
        self._accept(logits, first_row=0)

    def _accept(self, logits: torch.Tensor, first_row: int) -> None:
        """Sample for rows from `first_row` on, send the events, and drop the sequences that finished."""
        seqs = self._sequences[first_row:]
        tokens, logprobs = sample(logits, [s.sampling for s in seqs], self._fallback)
        events: dict[RequestStream, list[ChoiceEvent]] = {}
        for offset, (seq, token, lp) in enumerate(zip(seqs, tokens, logprobs, strict=True)):
            self._next_tokens[first_row + offset] = token
            events.setdefault(seq.stream, []).append(seq.accept(token, lp, self.eos_token_id, self.max_model_len))
        outbox: Outbox = {}
        for stream, batch_events in events.items():
            stream._deliver(batch_events, outbox)
        send(outbox)
        if any(s.finish_reason for s in seqs):
            self._remove([i for i, s in enumerate(self._sequences) if s.finish_reason is not None])

    def _fail_all(self, error: EngineError, admitted_too: Seq[RequestStream] | None = None) -> None:
        streams = {s.stream for s in self._sequences} | set(admitted_too or ())
        if self._staged is not None:
            streams.add(self._staged)
            self._staged = None
        if self._stopping:
            streams |= set(self.scheduler.remove(lambda _: True))
        for stream in streams:
            stream._deliver(error)
        self._sequences, self._next_tokens = [], []
        self._batch = RunningBatch(self._runner)


def default_kv_budget(model: PreTrainedModel, memory_fraction: float, max_rows: int, max_len: int) -> int:
    """KV-cache tokens that fit in `memory_fraction` of the free memory of the model's device.

    Never below one full-length sequence, never above `max_rows` full-length sequences.
    """
    free = torch.cuda.mem_get_info(model.device)[0] if model.device.type == "cuda" else _available_host_memory()
    budget = int(free * memory_fraction) // kv_bytes_per_token(model)
    return max(max_len, min(budget, max_rows * max_len))


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30
