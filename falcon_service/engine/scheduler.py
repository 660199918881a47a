"""Which requests join the running batch next: a bounded waiting queue and admission by budget."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the caller should retry later."""


@dataclass(frozen=True)
class BatchLimits:
    """Bounds on the running batch and on the prefill work of one step."""

    max_batch_size: int  # sequences decoding together (n choices count each)
    max_batch_tokens: int  # KV-cache token budget; each sequence reserves a whole context of it
    max_prefill_tokens: int  # prompt tokens prefilled in one step (one longer prompt may go alone)
    max_queue_size: int  # requests waiting to be admitted


@dataclass(frozen=True)
class Demand:
    """What admitting one request would add to the batch."""

    rows: int  # KV-cache rows: one per choice
    prompt_len: int


@dataclass(frozen=True)
class BatchLoad:
    """What the running batch holds."""

    rows: int


class Scheduler(Generic[T]):
    """First come, first served admission under `BatchLimits`; thread-safe waiting queue."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self._waiting: deque[tuple[T, Demand]] = deque()
        self._lock = threading.Lock()

    def add(self, item: T, demand: Demand) -> None:
        """Queue a request, or raise `QueueFullError` at once when the queue is at its bound."""
        with self._lock:
            if len(self._waiting) >= self.limits.max_queue_size:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append((item, demand))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def remove(self, predicate) -> list[T]:
        """Take out the waiting requests for which `predicate(item)` holds (aborted before admission)."""
        with self._lock:
            gone = [item for item, _ in self._waiting if predicate(item)]
            if gone:
                self._waiting = deque((i, d) for i, d in self._waiting if not predicate(i))
            return gone

    def fits(self, load: BatchLoad, demands: list[Demand]) -> bool:
        """Whether the batch has a free KV-cache row for every sequence in `demands`."""
        return load.rows + sum(d.rows for d in demands) <= self.limits.max_batch_size

    def admit(self, load: BatchLoad) -> list[T]:
        """Pop the requests, in arrival order, that join the batch at this step."""
        chosen: list[Demand] = []
        items: list[T] = []
        with self._lock:
            while self._waiting:
                item, demand = self._waiting[0]
                prefill = sum(d.prompt_len for d in chosen) + demand.prompt_len
                if chosen and prefill > self.limits.max_prefill_tokens:
                    break
                if not self.fits(load, [*chosen, demand]):
                    break
                self._waiting.popleft()
                chosen.append(demand)
                items.append(item)
        return items
