"""Scheduler: the bounded waiting queue and admission under `BatchLimits`, first come first served."""

from __future__ import annotations

import pytest

from falcon_service.engine.scheduler import BatchLimits, BatchLoad, Demand, QueueFullError, Scheduler

EMPTY = BatchLoad(rows=0)


def limits(batch: int = 64, tokens: int = 1_000_000, prefill: int = 100_000, queue: int = 64) -> BatchLimits:
    return BatchLimits(max_batch_size=batch, max_batch_tokens=tokens, max_prefill_tokens=prefill,
                       max_queue_size=queue)


def scheduler_with(lim: BatchLimits, *demands: Demand) -> Scheduler[str]:
    s: Scheduler[str] = Scheduler(lim)
    for i, d in enumerate(demands):
        s.add(f"r{i}", d)
    return s


def test_full_queue_raises_at_once_and_keeps_the_queue():
    s = scheduler_with(limits(queue=2), Demand(1, 4), Demand(1, 4))
    with pytest.raises(QueueFullError):
        s.add("r2", Demand(1, 4))
    assert s.num_waiting == 2
    assert s.admit(EMPTY) == ["r0", "r1"]
    s.add("r3", Demand(1, 4))  # room again once admitted
    assert s.num_waiting == 1


def test_zero_queue_size_rejects_everything():
    s: Scheduler[str] = Scheduler(limits(queue=0))
    with pytest.raises(QueueFullError):
        s.add("r0", Demand(1, 1))
    assert s.num_waiting == 0


def test_admission_respects_max_batch_size_counting_choices():
    s = scheduler_with(limits(batch=4), *[Demand(1, 5) for _ in range(6)])
    assert s.admit(EMPTY) == ["r0", "r1", "r2", "r3"]
    assert s.num_waiting == 2
    # three rows running: one more single choice fits, a request with n=2 does not
    s = scheduler_with(limits(batch=4), Demand(2, 5), Demand(1, 5))
    assert s.admit(BatchLoad(rows=3)) == []
    assert s.admit(BatchLoad(rows=2)) == ["r0"]
    assert s.admit(BatchLoad(rows=3)) == ["r1"]


def test_admission_respects_max_prefill_tokens():
    s = scheduler_with(limits(prefill=100), Demand(1, 60), Demand(1, 30), Demand(1, 50))
    assert s.admit(EMPTY) == ["r0", "r1"]  # 60 + 30 <= 100 < 60 + 30 + 50
    assert s.admit(EMPTY) == ["r2"]


def test_an_over_long_prompt_is_admitted_alone():
    s = scheduler_with(limits(prefill=100), Demand(1, 250), Demand(1, 5))
    assert s.admit(EMPTY) == ["r0"]
    assert s.admit(EMPTY) == ["r1"]
    s = scheduler_with(limits(prefill=100), Demand(1, 5), Demand(1, 250))
    assert s.admit(EMPTY) == ["r0"]  # not together with something already chosen
    assert s.admit(BatchLoad(rows=1)) == ["r1"]


def test_the_row_bound_holds_even_for_an_empty_batch():
    # every sequence needs a KV-cache row of its own: n=4 never fits 2 rows (the engine refuses it at submit)
    s = scheduler_with(limits(batch=2), Demand(4, 40), Demand(1, 5))
    assert s.admit(EMPTY) == []
    assert s.num_waiting == 2


def test_admission_is_first_come_first_served():
    # the head does not fit; a smaller request behind it must not overtake it
    s = scheduler_with(limits(batch=4), Demand(3, 5), Demand(1, 5), Demand(1, 5))
    assert s.admit(BatchLoad(rows=2)) == []
    assert s.admit(EMPTY) == ["r0", "r1"]
    assert s.admit(EMPTY) == ["r2"]


def test_remove_takes_out_matching_waiting_requests_in_order():
    s = scheduler_with(limits(), *[Demand(1, 5) for _ in range(5)])
    assert s.remove(lambda item: item in {"r1", "r3", "nope"}) == ["r1", "r3"]
    assert s.num_waiting == 3
    assert s.remove(lambda item: False) == []
    assert s.admit(EMPTY) == ["r0", "r2", "r4"]
    assert s.num_waiting == 0


def chunks(s: Scheduler[str], rows: list[int]) -> list[tuple[int, int]]:
    """The staged prompt's chunks, one step per entry of `rows` (what the batch holds at that step)."""
    out = []
    for n in rows:
        plan = s.plan(BatchLoad(rows=n))
        assert plan.chunk is not None and not plan.admitted and plan.decode == (n > 0)
        out.append((plan.chunk.start, plan.chunk.end))
    return out


def test_a_long_prompt_goes_in_longer_chunks_while_no_row_decodes():
    idle = BatchLimits(max_batch_size=8, max_batch_tokens=8 * 2048, max_prefill_tokens=100, max_queue_size=8,
                       idle_prefill_tokens=400)
    # alone: chunks of 400; with rows decoding: chunks of 100, so that their streams do not wait long
    assert chunks(scheduler_with(idle, Demand(1, 1000)), [0, 0, 0]) == [(0, 400), (400, 800), (800, 1000)]
    assert chunks(scheduler_with(idle, Demand(1, 350)), [3, 3, 3, 3]) == [(0, 100), (100, 200), (200, 300), (300, 350)]
    # the batch empties while the prompt is staged (its rows finish): the chunks grow; rows arrive: they shrink
    staged = scheduler_with(idle, Demand(1, 1000))
    assert chunks(staged, [2, 0, 1, 0]) == [(0, 100), (100, 500), (500, 600), (600, 1000)]
    # without an idle size the budget holds whatever the batch holds; a smaller idle size never shrinks it
    for lim in (limits(prefill=100), BatchLimits(8, 8 * 2048, 100, 8, idle_prefill_tokens=50)):
        assert chunks(scheduler_with(lim, Demand(1, 250)), [0, 0, 0]) == [(0, 100), (100, 200), (200, 250)]
    # what the prefix cache holds is skipped: the first chunk starts after it
    s = scheduler_with(idle, Demand(1, 1500))
    assert s.plan(EMPTY, lambda item: 700).chunk.start == 800
