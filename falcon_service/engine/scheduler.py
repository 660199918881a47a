"""The plan of each engine step: which requests join the running batch, which prompt chunk is
prefilled, whether the batch decodes. A bounded waiting queue, first come first served.

Policy, one pass over the weights per step where possible:
- New prompts (together at most `max_prefill_tokens`) are prefilled in the same pass as the
  running batch's decode step.
- A prompt longer than that is staged: prefilled a chunk of `max_prefill_tokens` per step in its
  own pass, each followed by a decode step of the running batch, and joins the batch when whole.
  Nothing else is admitted while a prompt is staged. While no row decodes, no stream waits on the
  chunks: they may be longer (`idle_prefill_tokens`), which costs fewer passes.
- Every sequence reserves a whole context row of the KV cache, so admission counts rows.
- Prompt tokens the prefix cache holds cost nothing: the prefill budget counts the others.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass(frozen=True)
class BatchLimits:
    """Bounds on the running batch and on the prefill work of one step."""

    max_batch_size: int  # sequences decoding together (n choices count each)
    max_batch_tokens: int  # KV-cache token budget; each sequence reserves a whole context of it
    max_prefill_tokens: int  # prompt tokens prefilled in one step (one longer prompt goes in chunks)
    max_queue_size: int  # requests waiting to be admitted
    idle_prefill_tokens: int | None = None  # a staged prompt's chunk while no row decodes; default the above

    def chunk_tokens(self, load: BatchLoad) -> int:
        """Tokens of a staged prompt to prefill in a step, given what the batch holds."""
        if load.rows == 0 and self.idle_prefill_tokens is not None:
            return max(self.idle_prefill_tokens, self.max_prefill_tokens)
        return self.max_prefill_tokens


@dataclass(frozen=True)
class Demand:
    """What admitting one request would add to the batch."""

    rows: int  # KV-cache rows: one per choice
    prompt_len: int


@dataclass(frozen=True)
class BatchLoad:
    """What the running batch holds."""

    rows: int


@dataclass(frozen=True)
class PrefillChunk(Generic[T]):
    """Tokens start..end of a staged request's prompt; `first` for its first chunk (which starts after
    what the prefix cache holds), `last` when the prompt is then complete."""

    item: T
    start: int
    end: int
    first: bool
    last: bool


@dataclass
class StepPlan(Generic[T]):
    """What one engine step does."""

    admitted: list[T] = field(default_factory=list)  # whole prompts prefilled this step (then they decode)
    chunk: PrefillChunk[T] | None = None  # the next chunk of a staged long prompt, in its own pass
    decode: bool = False  # the running batch decodes (with `admitted` in one pass)

    @property
    def empty(self) -> bool:
        return not (self.admitted or self.chunk or self.decode)


def _prefill_cost(item: T, demand: Demand, to_prefill: Callable[[T], int] | None) -> int:
    """Prompt tokens of a waiting request that need computing: `to_prefill`'s answer, by default all."""
    return to_prefill(item) if to_prefill is not None else demand.prompt_len


class Scheduler(Generic[T]):
    """First come, first served admission under `BatchLimits`; thread-safe waiting queue.

    `add` and `remove` may be called from any thread; `plan` only from the engine's.
    """

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._waiting: deque[tuple[T, Demand]] = deque()
        self._lock = threading.Lock()
        self._staged: tuple[T, Demand] | None = None
        self._staged_done = 0

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
    def staged(self) -> T | None:
        return self._staged[0] if self._staged else None

    @property
    def has_work(self) -> bool:
        return bool(self._waiting) or self._staged is not None

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

    def fits(self, load: BatchLoad, demands: list[Demand]) -> bool:
        """Whether the batch has a free KV-cache row for every sequence in `demands`."""
        return load.rows + sum(d.rows for d in demands) <= self.limits.max_batch_size

    def admit(self, load: BatchLoad, to_prefill: Callable[[T], int] | None = None) -> list[T]:
        """Pop the requests, in arrival order, that join the batch at this step; `to_prefill(item)` is how
        many of its prompt tokens need computing (the rest are cached), by default all."""
        chosen: list[Demand] = []
        items: list[T] = []
        prefill = 0
        with self._lock:
            while self._waiting:
                item, demand = self._waiting[0]
                cost = _prefill_cost(item, demand, to_prefill)
                if chosen and prefill + cost > self.limits.max_prefill_tokens:
                    break
                if not self.fits(load, [*chosen, demand]):
                    break
                self._waiting.popleft()
                chosen.append(demand)
                items.append(item)
                prefill += cost
        return items

    def plan(self, load: BatchLoad, to_prefill: Callable[[T], int] | None = None) -> StepPlan[T]:
        """The next step, given the rows the running batch holds and how many prompt tokens of a request
        need computing (`to_prefill`, default all); assumes the step then runs."""
        first = False
        if self._staged is None:
            with self._lock:
                head = self._waiting[0] if self._waiting else None
            cost = 0 if head is None else _prefill_cost(*head, to_prefill)
            if head is not None and cost > self.limits.max_prefill_tokens:
                if not self.fits(load, [head[1]]):
                    return StepPlan(decode=load.rows > 0)
                with self._lock:
                    self._staged = self._waiting.popleft()
                self._staged_done, first = head[1].prompt_len - cost, True
            else:
                return StepPlan(admitted=self.admit(load, to_prefill), decode=load.rows > 0)
        item, demand = self._staged
        start = self._staged_done
        end = min(demand.prompt_len, start + self.limits.chunk_tokens(load))
        self._staged_done = end
        last = end == demand.prompt_len
        if last:
            self._staged = None
        return StepPlan(chunk=PrefillChunk(item, start, end, first, last), decode=load.rows > 0)

    def drop_staged(self) -> T | None:
        """Forget the staged request (its step failed); returns it."""
        item, self._staged = (self._staged[0] if self._staged else None), None
        return item
