"""The async face of generation: submit a request, iterate its events, abort it; and the step loop.

One thread owns the model and runs the step loop; asyncio callers never block on torch.
Requests go in through the scheduler's thread-safe queue; events come back to each caller's
event loop with `call_soon_threadsafe` (see `stream.py`).

Each step: ask the scheduler for the plan (the sequences that leave, those that decode, the prompts
to prefill with what the prefix cache holds of them) and execute it: free the rows, run the step's
tokens through the model as one flat batch in one pass, sample (all on the device; the sampled
tokens stay there as the next step's input), and read the sampled tokens back to detokenize, match
stops and send events. On a GPU that host work overlaps the device: step k's results are read while
step k+1 runs, so a choice that stops at step k (EOS, a stop string) is computed one step further
and that token dropped. Choices that end by length are known in advance and never computed past
their end. Sequences are known by id; which row of the KV cache holds one is `KVRows`' business.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .batch import NewPrompt, RunningBatch, StagedChunk
from .cuda_graphs import Capture, DecodeGraphs, StepGraphs
from .falcon import FalconRunner, context_length
from .grammar import GrammarCompiler, GrammarLimits
from .prefix_cache import PrefixMatch, salt_key
from .request import (
    ChoiceEvent,
    EngineError,
    EngineObserver,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    RequestRecord,
)
from .sampling import SampledOnHost, SamplingParams, TokenLogprob, sample
from .scheduler import Admission, BatchLimits, Demand, QueueFullError, Scheduler, StepPlan
from .sequence import SequenceState
from .stream import Outbox, RequestStream, send

__all__ = [
    "ChoiceEvent", "Engine", "EngineError", "EngineObserver", "FinishReason", "GenerationRequest", "InvalidRequest",
    "QueueFullError", "RequestRecord", "RequestStream", "SamplingParams", "TokenLogprob",
]

log = logging.getLogger(__name__)

RunnerFactory = Callable[[PreTrainedModel, int, int], FalconRunner]


def check_request(request: GenerationRequest, max_model_len: int, max_batch_size: int) -> None:
    """Raise `InvalidRequest` for what the engine cannot serve: an empty prompt, one that with its `max_tokens`
    passes the context, more choices than the batch holds."""
    if not request.prompt_ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if len(request.prompt_ids) + request.params.max_tokens > max_model_len:
        raise InvalidRequest("prompt plus max_tokens exceeds the model's context length", param="max_tokens",
                             code="context_length_exceeded")
    if request.n > max_batch_size:
        raise InvalidRequest(f"n={request.n} is more than the {max_batch_size} sequences "
                             "this server decodes at once", param="n")


@dataclass(frozen=True)
class Liveness:
    """The step loop's vital signs: whether it runs (or is stopping on purpose), the steps failed in a row,
    whether it has work, and seconds since it last finished a step (or got work after an idle spell)."""

    running: bool
    failed_steps: int
    working: bool
    since_step: float


def judge_liveness(signs: Liveness, stall_seconds: float, max_failed_steps: int = 3) -> tuple[bool, str]:
    """Alive unless the step loop has ended, has had work and finished no step for `stall_seconds` (a hung
    kernel, a deadlock), or failed `max_failed_steps` steps in a row (a broken device: every step fails)."""
    if not signs.running:
        return False, "the engine's step loop has ended"
    if signs.failed_steps >= max_failed_steps:
        return False, f"{signs.failed_steps} generation steps failed in a row"
    if signs.working and signs.since_step > stall_seconds:
        return False, f"the engine has had work and finished no step for {signs.since_step:.0f} s"
    return True, "ok"


@dataclass
class _Launched:
    """Tokens sampled for these sequences (in row order), on their way to the host."""

    sequences: list[SequenceState]
    sampled: SampledOnHost


class Engine:
    """Iteration-level batching: new requests join at the next step, finished ones leave at once.

    `cuda_graphs` and `overlap` default to on for a CUDA model and off on the CPU (where there is
    no launch overhead to save and no device to overlap with). `graph_capture` replaces the CUDA
    graph capture (tests replay decode steps, and the pieces of steps that prefill, through the same
    buckets on a CPU).

    The KV budget (`limits.max_batch_tokens`) buys whole-context rows. At most `max_batch_size` run;
    with `prefix_caching` the others keep finished sequences' prefixes for new prompts to reuse.
    """

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, limits: BatchLimits,
        observer: EngineObserver | None = None, runner_factory: RunnerFactory = FalconRunner,
        threads: int | None = None, cuda_graphs: bool | None = None, overlap: bool | None = None,
        graph_capture: Capture | None = None, prefix_caching: bool = False, grammar_limits: GrammarLimits | None = None,
    ) -> None:
        self.model = model.eval()
        self.threads = threads
        self.observer = observer
        self.tokenizer = tokenizer
        self.grammars = GrammarCompiler(tokenizer, grammar_limits)  # callers compile off this engine's thread
        self.max_model_len = context_length(model.config)
        self.eos_token_id = tokenizer.eos_token_id
        self.vocab_size = model.config.vocab_size
        # every row of the KV cache can hold a whole context: the token budget decides the rows
        pool = max(1, limits.max_batch_tokens // self.max_model_len)
        rows = min(limits.max_batch_size, pool)
        self.limits = replace(limits, max_batch_size=rows)
        self.prefix_caching = prefix_caching
        self.scheduler: Scheduler[RequestStream] = Scheduler(self.limits)
        self._runner = runner_factory(self.model, rows, self.max_model_len, pool_rows=pool if prefix_caching else rows)
        self.io = self._runner.io
        on_cuda = self._runner.device.type == "cuda"
        self.overlap = on_cuda if overlap is None else overlap
        self.graphs: DecodeGraphs | None = None
        self.step_graphs: StepGraphs | None = None
        if graph_capture is not None or (on_cuda if cuda_graphs is None else cuda_graphs):
            # buckets are captured when first needed (or all before serving: capture_graphs)
            self.graphs = DecodeGraphs(self._runner, graph_capture)
            step_tokens = rows + max(limits.max_prefill_tokens, limits.idle_prefill_tokens or 0)
            self.step_graphs = StepGraphs(self._runner, step_tokens, graph_capture)
        self._batch = self._new_batch()
        self._sequences: dict[int, SequenceState] = {}  # the running sequences, by id
        self._pending: list[_Launched] = []  # launched at earlier steps, not yet read back (overlap)
        self._launched: list[_Launched] = []  # launched at this step, not yet read back
        self._aborted: set[RequestStream] = set()
        # liveness: when the step loop last finished a step while it had work (a heartbeat), and how many steps
        # failed in a row (a CUDA fault fails every step after it)
        self._heartbeat = time.monotonic()
        self._working = False
        self.failed_steps = 0
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="falcon-engine", daemon=True)
        self._thread.start()

    def capture_graphs(self) -> float:
        """Capture every graph now (before serving), so no step waits for a capture; seconds."""
        seconds = self.graphs.capture_all() if self.graphs is not None else 0.0
        return seconds + (self.step_graphs.capture_all() if self.step_graphs is not None else 0.0)

    def _new_batch(self) -> RunningBatch:
        return RunningBatch(self._runner, self.graphs, self.prefix_caching, self.step_graphs)

    # ---- caller side (any event loop) ----

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request and return its stream; raises `QueueFullError` when the queue is full."""
        check_request(request, self.max_model_len, self.limits.max_batch_size)
        stream = RequestStream(request, asyncio.get_running_loop(), self._abort, self.observer)
        self.enqueue(stream)
        return stream

    def enqueue(self, stream: RequestStream) -> None:
        """Queue a checked request's stream (made by the caller, whose events go where it says)."""
        with self._wake:
            try:
                self.scheduler.add(stream, Demand(stream.request.n, len(stream.request.prompt_ids)))
            except QueueFullError:
                if self.observer is not None:
                    self.observer.on_rejected()
                raise
            self._wake.notify()

    def _abort(self, stream: RequestStream) -> None:
        with self._wake:
            self._aborted.add(stream)
            self._wake.notify()

    def stats(self) -> dict[str, int]:
        """Point-in-time counts for metrics and health checks."""
        return {
            "waiting": self.scheduler.num_waiting,
            "running": self.scheduler.num_running,
            "cache_tokens": self._batch.cache_tokens,
            "prefix_tokens": self._batch.idle_tokens,
        }

    def alive(self, stall_seconds: float = 60.0, max_failed_steps: int = 3) -> tuple[bool, str]:
        """Whether the engine still makes progress, and why not (`judge_liveness`). An orchestrator restarts an
        engine that is not alive."""
        return judge_liveness(self.liveness(), stall_seconds, max_failed_steps)

    def liveness(self) -> Liveness:
        """What liveness is judged on, now."""
        return Liveness(self._thread.is_alive() or self._stopping, self.failed_steps, self._working,
                        time.monotonic() - self._heartbeat)

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)
        self.grammars.close()

    # ---- engine thread ----

    def _has_work(self) -> bool:
        return bool(self._stopping or self._aborted or self._pending or self.scheduler.has_work)

    def _run(self) -> None:
        if self.threads:
            # OpenMP teams belong to the thread that starts them: the step loop's team is this thread's
            torch.set_num_threads(self.threads)
        while True:
            with self._wake:
                while not self._has_work():
                    self._working = False
                    self._wake.wait()
                if self._stopping:
                    break
                if not self._working:  # work again after an idle spell: the stall clock starts now
                    self._working, self._heartbeat = True, time.monotonic()
                aborted, self._aborted = self._aborted, set()
            plan: StepPlan[RequestStream] | None = None
            try:
                self._drop_aborted(aborted)
                plan = self.scheduler.plan(self._lookup)
                self._execute(plan)
                launched, self._launched = self._launched, []
                pending, self._pending = self._pending, []
                if pending:
                    self._finish(pending)
                if self.overlap:
                    self._pending = launched
                elif launched:
                    self._finish(launched)
                self.failed_steps = 0
                self._heartbeat = time.monotonic()
            except Exception:  # a failing step must not take the server down
                log.exception("generation step failed")
                self.failed_steps += 1
                self._heartbeat = time.monotonic()
                self._fail_all(EngineError("generation failed inside the engine"), plan)
            if self.observer is not None:
                stats = self.stats()
                self.observer.on_step(stats["waiting"], stats["running"], stats["cache_tokens"],
                                      stats["prefix_tokens"])
        self._fail_all(EngineError("the engine is shutting down"), None)

    def _drop_aborted(self, aborted: set[RequestStream]) -> None:
        if not aborted:
            return
        outbox: Outbox = {}
        for stream in self.scheduler.remove(lambda s: s in aborted):
            stream.end_all(FinishReason.ABORT, outbox)
        events: dict[RequestStream, list[ChoiceEvent]] = {}
        for seq in self._sequences.values():
            if seq.stream in aborted and seq.finish_reason is None:
                seq.finish_reason = FinishReason.ABORT
                events.setdefault(seq.stream, []).append(ChoiceEvent(seq.index, "", finish_reason=FinishReason.ABORT))
        self._done([s for s in self._sequences.values() if s.stream in aborted])
        for stream, batch_events in events.items():
            stream.deliver(batch_events, outbox)
        send(outbox)

    def _done(self, sequences: Seq[SequenceState]) -> None:
        """Tell the scheduler which of these sequences are done: their rows go at the next step."""
        self.scheduler.finish({s.seq_id for s in sequences if s.done})

    def _lookup(self, stream: RequestStream) -> PrefixMatch | None:
        """What the prefix cache holds of a waiting request's prompt (the scheduler counts the rest)."""
        return self._batch.lookup(stream.request.prompt_ids, salt_key(stream.request.cache_salt))

    def _execute(self, plan: StepPlan[RequestStream]) -> None:
        """Run exactly the plan: free its rows, then one pass over the weights for its decode rows and prompt
        chunks, and sampling; what was sampled is in `_launched`, not yet read back."""
        batch = self._batch
        if plan.free:
            gone = [self._sequences.pop(i) for i in plan.free]
            keep = {s.seq_id: (s.tokens, salt_key(s.stream.request.cache_salt)) for s in gone} \
                if self.prefix_caching else None
            # the prefixes this step's prompts were planned with stay: freeing rows must not evict them
            matches = [a.cached for a in plan.admitted] + ([plan.chunk.cached] if plan.chunk is not None else [])
            batch.free(plan.free, keep, matches)  # type: ignore[arg-type]
        assert len(batch.ids) == len(plan.decode) and set(batch.ids) == set(plan.decode), \
            "the plan's decoding sequences are those holding rows"
        decoding = [self._sequences[i] for i in batch.ids]  # in row order
        prompts = []
        for a in plan.admitted:
            request = a.item.request
            a.item.cached_tokens = a.cached.length if a.cached is not None else 0  # counted for usage
            prompts.append(NewPrompt(a.seq_ids, request.prompt_ids, a.cached,  # type: ignore[arg-type]
                                     salt_key(request.cache_salt)))
        chunk = None
        if plan.chunk is not None:
            c, request = plan.chunk, plan.chunk.item.request
            if c.first:
                c.item.cached_tokens = c.cached.length if c.cached is not None else 0
            chunk = StagedChunk(c.seq_ids, request.prompt_ids, c.start, c.end,
                                c.cached if c.first else None, salt_key(request.cache_salt))  # type: ignore[arg-type]
        if not decoding and not prompts and chunk is None:
            return
        logits = batch.run(bool(decoding), prompts, chunk)
        new = self._join(plan.admitted)
        if plan.chunk is not None and plan.chunk.last:
            new += self._join([Admission(plan.chunk.item, plan.chunk.seq_ids)])
        if decoding or new:
            self._sample(decoding + new, logits, first_row=0)

    def _join(self, admitted: Seq[Admission[RequestStream]]) -> list[SequenceState]:
        """Track the choices of newly prefilled requests (their rows are the last ones)."""
        new = []
        for admission in admitted:
            for index, seq_id in enumerate(admission.seq_ids):
                seq = SequenceState(admission.item, index, self.tokenizer, self.vocab_size, self.io,
                                    self.max_model_len, seq_id)
                self._sequences[seq_id] = seq
                new.append(seq)
        return new

    def _sample(self, sequences: list[SequenceState], logits: torch.Tensor, first_row: int) -> None:
        """Sample for rows first_row.. (these sequences); the tokens feed their next decode step."""
        if any(s.sampling.matcher is not None and s.scheduled > len(s.output_ids) for s in sequences):
            # a grammar's mask depends on the token sampled last, which is still on its way (the step before,
            # with overlap): read it back first (the forward pass is already on its way, so only the
            # sampling waits)
            unread, self._pending, self._launched = self._pending + self._launched, [], []
            self._finish(unread)
        sampled = sample(logits, [s.sampling for s in sequences], self.io)
        self._batch.set_tokens(first_row, sampled.tokens)
        for seq in sequences:
            seq.scheduled += 1
        self._done(sequences)  # those with every token they may make on its way
        self._launched.append(_Launched(sequences, sampled.download(self.io)))

    def _finish(self, launched: list[_Launched]) -> None:
        """Read sampled tokens back; detokenize, match stops and send each stream its events."""
        events: dict[RequestStream, list[ChoiceEvent]] = {}
        broken: set[RequestStream] = set()
        for part in launched:
            tokens, logprobs = part.sampled.result()
            for seq, token, lp in zip(part.sequences, tokens, logprobs, strict=True):
                if seq.finish_reason is not None:  # it ended (stop, abort) while this step ran
                    continue
                event = seq.accept(token, lp, self.eos_token_id)
                events.setdefault(seq.stream, []).append(event)
                if event.finish_reason is not None:
                    self.scheduler.finish([seq.seq_id])
                if event.finish_reason is FinishReason.ERROR:
                    log.error("request %s, choice %d: its grammar rejected the sampled token %d (an engine fault); "
                              "the request fails", seq.stream.request.request_id, seq.index, token)
                    broken.add(seq.stream)
        for stream in broken:
            self._fail_request(stream)
            events.pop(stream)
        outbox: Outbox = {}
        for stream, batch_events in events.items():
            stream.deliver(batch_events, outbox)
        send(outbox)

    def _fail_request(self, stream: RequestStream) -> None:
        """End a request whose reply broke its grammar: its choices stop, the caller gets an `EngineError`."""
        for seq in self._sequences.values():
            if seq.stream is stream and seq.finish_reason is None:
                seq.finish_reason = FinishReason.ERROR
                self.scheduler.finish([seq.seq_id])
        if self.observer is not None:
            self.observer.on_grammar_rejection()
        stream.deliver(EngineError("a sampled token broke the reply's grammar"))

    def _fail_all(self, error: EngineError, plan: StepPlan[RequestStream] | None) -> None:
        """End every request the engine holds with `error` (waiting ones too when shutting down)."""
        streams = {s.stream for s in self._sequences.values()}
        streams |= {s.stream for part in self._pending + self._launched for s in part.sequences}
        if plan is not None:
            streams |= {a.item for a in plan.admitted}
            if plan.chunk is not None:
                streams.add(plan.chunk.item)
        staged = self.scheduler.drop_staged()
        if staged is not None:
            streams.add(staged)
        if self._stopping:
            streams |= set(self.scheduler.remove(lambda _: True))
        for stream in streams:
            if not stream.ended:
                stream.deliver(error)
        self._sequences, self._pending, self._launched = {}, [], []
        self.scheduler.clear_running()
        self._batch = self._new_batch()
