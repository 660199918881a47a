"""The caller's handle on a submitted request, and the hand-over of events from the engine thread.

A `RequestStream` lives on two threads: the caller iterates its events on its own event loop;
the engine thread `deliver`s them, accounting for them as it goes (tokens, timing, the record
reported once the last choice has ended). Events of one engine step travel to each event loop in
one `call_soon_threadsafe` (an `Outbox`), not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from .request import ChoiceEvent, EngineObserver, FinishReason, GenerationRequest, RequestRecord

Item = list[ChoiceEvent] | BaseException
Outbox = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Item]]]


def _put_all(items: list[tuple[asyncio.Queue, Item]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def send(outbox: Outbox) -> None:
    """Hand a step's events to their event loops: one wake-up per loop, not one per request."""
    for loop, items in outbox.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            loop.call_soon_threadsafe(_put_all, items)


class RequestStream:
    """An async iterator of a request's `ChoiceEvent`s; `abort()` stops its generation."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
                 on_abort: Callable[[RequestStream], None], observer: EngineObserver | None = None) -> None:
        self.request = request
        self.prompt_tokens = len(request.prompt_ids)
        self.cached_tokens = 0  # prompt tokens whose KV came from the prefix cache (set at admission)
        self.completion_tokens = 0
        self.finish_reasons: dict[int, FinishReason] = {}
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self._loop = loop
        self._on_abort = on_abort
        self._observer = observer
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._open = request.n
        self._aborted = False
        # engine-thread side: which choices ended how, and tokens made
        self._ended: dict[int, FinishReason] = {}
        self._generated: dict[int, int] = {}

    @property
    def finished(self) -> bool:
        return self._open == 0

    @property
    def ended(self) -> bool:
        """Every choice has ended, as the engine thread knows it (`finished` is the caller's view)."""
        return len(self._ended) == self.request.n

    @property
    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        """Stop generating for this request; its sequences leave the batch at the next step."""
        if not self.finished and not self._aborted:
            self._aborted = True
            self._on_abort(self)

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

    # ---- engine thread ----

    def deliver(self, item: Item, outbox: Outbox | None = None) -> None:
        """Send events (or the error that ends the request) to the caller, or into `outbox` to be sent
        with the rest of the step's events in one hand-over."""
        self._account(item)
        if outbox is None:
            send({self._loop: [(self._queue, item)]})
        else:
            outbox.setdefault(self._loop, []).append((self._queue, item))

    def end_all(self, reason: FinishReason, outbox: Outbox | None = None) -> None:
        """End every choice that has not ended yet (abort before or during generation)."""
        events = [ChoiceEvent(i, "", finish_reason=reason) for i in range(self.request.n) if i not in self._ended]
        if events:
            self.deliver(events, outbox)

    def _account(self, item: Item) -> None:
        """Engine-side bookkeeping; reports the request's record once its last choice has ended."""
        now = time.monotonic()
        record = None
        if isinstance(item, BaseException):
            if len(self._ended) < self.request.n:
                self._ended.update({i: FinishReason.ERROR for i in range(self.request.n)})
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
        if record is not None and self._observer is not None:
            self._observer.on_request_done(record)

    def _record(self, now: float) -> RequestRecord:
        reasons = set(self._ended.values())
        order = (FinishReason.ERROR, FinishReason.ABORT, FinishReason.LENGTH)
        reason = next((r for r in order if r in reasons), FinishReason.STOP)
        longest = max(self._generated.values(), default=0)
        ttft = tpot = None
        if self.first_token_at is not None:
            ttft = self.first_token_at - self.submitted_at
            if longest > 1:
                tpot = (now - self.first_token_at) / (longest - 1)
        return RequestRecord(self.prompt_tokens, sum(self._generated.values()), ttft, tpot, reason,
                             self.cached_tokens)
