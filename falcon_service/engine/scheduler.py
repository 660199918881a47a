"""The plan of each engine step, the whole of it: which sequences leave (their rows freed), which decode,
which prompts are prefilled (with what the prefix cache holds of them). A bounded waiting queue, first
come first served. The engine executes the plan and nothing else, in one pass over the weights.

Policy:
- New prompts (together at most `max_prefill_tokens` computed) are prefilled in the same pass as the
  running sequences' decode step.
- A prompt longer than that is staged: prefilled a chunk of `max_prefill_tokens` per step, in the same
  pass as the decode step, and its choices join the running sequences when it is whole. Nothing else
  is admitted while a prompt is staged. While nothing decodes, no stream waits on the chunks: they may
  be longer (`idle_prefill_tokens`), which costs fewer passes.
- Every sequence reserves a whole context row of the KV cache, so admission counts sequences (rows).
- Prompt tokens the prefix cache holds cost nothing: the prefill budget counts the others.

Sequences are known by ids that the scheduler gives out: an admitted request of `n` choices gets `n`.
The engine tells it which sequences are done (`finish`): they leave at the next step.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


class Cached(Protocol):
    """What the prefix cache holds of a prompt: its first `length` tokens."""

    length: int


Lookup = Callable[[T], "Cached | None"]


@dataclass(frozen=True)
class BatchLimits:
    """Bounds on the running sequences and on the prefill work of one step."""

    max_batch_size: int  # sequences decoding together (n choices count each)
    max_batch_tokens: int  # KV-cache token budget; each sequence reserves a whole context of it
    max_prefill_tokens: int  # prompt tokens prefilled in one step (one longer prompt goes in chunks)
    max_queue_size: int  # requests waiting to be admitted
    idle_prefill_tokens: int | None = None  # a staged prompt's chunk while nothing decodes; default the above

    def chunk_tokens(self, decoding: int) -> int:
        """Tokens of a staged prompt to prefill in a step, given how many sequences decode in it."""
        if decoding == 0 and self.idle_prefill_tokens is not None:
            return max(self.idle_prefill_tokens, self.max_prefill_tokens)
        return self.max_prefill_tokens


@dataclass(frozen=True)
class Demand:
    """What admitting one request would add."""

    rows: int  # KV-cache rows: one per choice
    prompt_len: int


@dataclass(frozen=True)
class Admission(Generic[T]):
    """A request whose whole prompt is prefilled this step (after `cached` tokens the prefix cache holds);
    its choices are the sequences `seq_ids`, which decode from the next step on."""

    item: T
    seq_ids: tuple[int, ...]
    cached: Cached | None = None


@dataclass(frozen=True)
class PrefillChunk(Generic[T]):
    """Tokens start..end of the staged request's prompt. The first chunk starts after what the prefix cache
    holds (`cached`); after the `last`, the choices `seq_ids` decode from the next step on."""

    item: T
    seq_ids: tuple[int, ...]
    start: int
    end: int
    first: bool
    last: bool
    cached: Cached | None = None


@dataclass
class StepPlan(Generic[T]):
    """What one engine step does, all of it."""

    free: list[int] = field(default_factory=list)  # sequences that left: their rows are freed first
    decode: list[int] = field(default_factory=list)  # sequences that feed one token each
    admitted: list[Admission[T]] = field(default_factory=list)  # whole prompts prefilled in the same pass
    chunk: PrefillChunk[T] | None = None  # the next chunk of the staged prompt, in the same pass

    @property
    def empty(self) -> bool:
        return not (self.free or self.decode or self.admitted or self.chunk)


def _cost(item: T, demand: Demand, lookup: Lookup | None) -> tuple[int, Cached | None]:
    """Prompt tokens of a waiting request that need computing, and what the prefix cache holds of it."""
    cached = lookup(item) if lookup is not None else None
    return demand.prompt_len - (cached.length if cached is not None else 0), cached


class Scheduler(Generic[T]):
    """First come, first served admission under `BatchLimits`; a thread-safe waiting queue; the running
    sequences by id.

    `add` and `remove` may be called from any thread; `plan` and `finish` only from the engine's.
    """

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._waiting: deque[tuple[T, Demand]] = deque()
        self._lock = threading.Lock()
        self._staged: tuple[T, Demand, tuple[int, ...]] | None = None
        self._staged_done = 0
        self._running: dict[int, None] = {}  # sequences that decode, in the order they joined
        self._done: set[int] = set()  # running sequences that are done: freed at the next step
        self._ids = itertools.count()

    def add(self, item: T, demand: Demand) -> None:
        """Queue a request, or raise `QueueFullError` at once when the queue is at its bound."""
        with self._lock:
            if len(self._waiting) >= self.limits.max_queue_size:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append((item, demand))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Sequences that hold a row (until the step that frees them)."""
        return len(self._running)

    @property
    def staged(self) -> T | None:
        return self._staged[0] if self._staged else None

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._staged is not None)

    def remove(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out the waiting (or staged) requests for which `predicate(item)` holds."""
        with self._lock:
            gone = [item for item, _ in self._waiting if predicate(item)]
            if gone:
                self._waiting = deque((i, d) for i, d in self._waiting if not predicate(i))
        if self._staged is not None and predicate(self._staged[0]):
            gone.append(self._staged[0])
            self._staged = None
        return gone

    def finish(self, seq_ids: list[int] | set[int]) -> None:
        """These sequences are done (ended, aborted, or every token they may make is on its way): their rows
        are freed at the next step."""
        self._done.update(i for i in seq_ids if i in self._running)

    def drop_staged(self) -> T | None:
        """Forget the staged request (its step failed); returns it."""
        item, self._staged = (self._staged[0] if self._staged else None), None
        return item

    def clear_running(self) -> None:
        """Forget every running sequence (a failed step ended them all; their rows are gone)."""
        self._running.clear()
        self._done.clear()

    def _fits(self, rows: int, demands: list[Demand]) -> bool:
        return rows + sum(d.rows for d in demands) <= self.limits.max_batch_size

    def _new_ids(self, demand: Demand) -> tuple[int, ...]:
        return tuple(next(self._ids) for _ in range(demand.rows))

    def plan(self, lookup: Lookup | None = None) -> StepPlan[T]:
        """The next step; `lookup(item)` says what the prefix cache holds of a waiting request's prompt (by
        default nothing). Assumes the step then runs: its admitted sequences are running from now on."""
        free = [i for i in self._running if i in self._done]
        for i in free:
            del self._running[i]
        self._done.clear()
        plan: StepPlan[T] = StepPlan(free=free, decode=list(self._running))
        rows = len(self._running)
        if self._staged is None:
            with self._lock:
                head = self._waiting[0] if self._waiting else None
            if head is None:
                return plan
            cost, cached = _cost(*head, lookup)
            if cost <= self.limits.max_prefill_tokens:
                plan.admitted = self._admit(rows, lookup, cost, cached)
                for admission in plan.admitted:
                    self._running.update(dict.fromkeys(admission.seq_ids))
                return plan
            if not self._fits(rows, [head[1]]):
                return plan
            with self._lock:
                self._waiting.popleft()
            self._staged = (head[0], head[1], self._new_ids(head[1]))
            self._staged_done, first = head[1].prompt_len - cost, True
        else:
            first, cached = False, None
        item, demand, seq_ids = self._staged
        start = self._staged_done
        end = min(demand.prompt_len, start + self.limits.chunk_tokens(len(plan.decode)))
        self._staged_done = end
        last = end == demand.prompt_len
        if last:
            self._staged = None
            self._running.update(dict.fromkeys(seq_ids))
        plan.chunk = PrefillChunk(item, seq_ids, start, end, first, last, cached)
        return plan

    def _admit(self, rows: int, lookup: Lookup | None, cost: int, cached: Cached | None) -> list[Admission[T]]:
        """Pop the requests, in arrival order, that fit this step (the head's cost and cache are known)."""
        chosen: list[Demand] = []
        admitted: list[Admission[T]] = []
        prefill = 0
        with self._lock:
            while self._waiting:
                item, demand = self._waiting[0]
                if admitted:
                    cost, cached = _cost(item, demand, lookup)
                    if prefill + cost > self.limits.max_prefill_tokens:
                        break
                elif cost > self.limits.max_prefill_tokens:
                    break
                if not self._fits(rows, [*chosen, demand]):
                    break
                self._waiting.popleft()
                chosen.append(demand)
                admitted.append(Admission(item, self._new_ids(demand), cached))
                prefill += cost
        return admitted
