"""Scheduler: the bounded waiting queue, admission under `BatchLimits` (first come first served), and the
plan of each step as the whole step: the sequences that leave, those that decode, the prompts prefilled."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from falcon_service.engine.scheduler import BatchLimits, Demand, QueueFullError, Scheduler, StepPlan


def limits(batch: int = 64, tokens: int = 1_000_000, prefill: int = 100_000, queue: int = 64) -> BatchLimits:
    return BatchLimits(max_batch_size=batch, max_batch_tokens=tokens, max_prefill_tokens=prefill,
                       max_queue_size=queue)


def scheduler_with(lim: BatchLimits, *demands: Demand) -> Scheduler[str]:
    s: Scheduler[str] = Scheduler(lim)
    for i, d in enumerate(demands):
        s.add(f"r{i}", d)
    return s


def admitted(plan: StepPlan[str]) -> list[str]:
    return [a.item for a in plan.admitted]


def test_full_queue_raises_at_once_and_keeps_the_queue():
    s = scheduler_with(limits(queue=2), Demand(1, 4), Demand(1, 4))
    with pytest.raises(QueueFullError):
        s.add("r2", Demand(1, 4))
    assert s.num_waiting == 2
    assert admitted(s.plan()) == ["r0", "r1"]
    s.add("r3", Demand(1, 4))  # room again once admitted
    assert s.num_waiting == 1


def test_zero_queue_size_rejects_everything():
    s: Scheduler[str] = Scheduler(limits(queue=0))
    with pytest.raises(QueueFullError):
        s.add("r0", Demand(1, 1))
    assert s.num_waiting == 0


def test_admission_respects_max_batch_size_counting_choices():
    s = scheduler_with(limits(batch=4), *[Demand(1, 5) for _ in range(6)])
    assert admitted(s.plan()) == ["r0", "r1", "r2", "r3"]
    assert s.num_waiting == 2 and s.num_running == 4
    # three rows running: a request with n=2 does not fit, and the one behind it waits its turn
    s = scheduler_with(limits(batch=4), Demand(1, 5), Demand(1, 5), Demand(1, 5), Demand(2, 5), Demand(1, 5))
    first = s.plan()
    assert admitted(first) == ["r0", "r1", "r2"]
    assert admitted(s.plan()) == []
    s.finish([first.admitted[0].seq_ids[0]])  # one leaves: its row is freed at the next step...
    plan = s.plan()
    assert plan.free == list(first.admitted[0].seq_ids) and admitted(plan) == ["r3"]  # ...which has room for two
    assert admitted(s.plan()) == []  # 2 + 2 rows: full
    assert s.num_running == 4


def test_admission_respects_max_prefill_tokens():
    s = scheduler_with(limits(prefill=100), Demand(1, 60), Demand(1, 30), Demand(1, 50))
    assert admitted(s.plan()) == ["r0", "r1"]  # 60 + 30 <= 100 < 60 + 30 + 50
    assert admitted(s.plan()) == ["r2"]


def test_a_prompt_over_the_budget_is_staged_alone_and_nothing_else_joins_meanwhile():
    s = scheduler_with(limits(prefill=100), Demand(1, 250), Demand(1, 5))
    plans = [s.plan() for _ in range(3)]
    assert [(p.chunk.start, p.chunk.end) for p in plans] == [(0, 100), (100, 200), (200, 250)]
    assert all(admitted(p) == [] for p in plans)
    assert admitted(s.plan()) == ["r1"]
    s = scheduler_with(limits(prefill=100), Demand(1, 5), Demand(1, 250))
    assert admitted(s.plan()) == ["r0"]  # not together with something already chosen
    assert s.plan().chunk is not None


def test_the_row_bound_holds_even_for_an_empty_batch():
    # every sequence needs a KV-cache row of its own: n=4 never fits 2 rows (the engine refuses it at submit)
    s = scheduler_with(limits(batch=2), Demand(4, 40), Demand(1, 5))
    assert s.plan().empty
    assert s.num_waiting == 2


def test_admission_is_first_come_first_served():
    # the head does not fit; a smaller request behind it must not overtake it
    s = scheduler_with(limits(batch=4), Demand(1, 5), Demand(1, 5), Demand(3, 5), Demand(1, 5), Demand(1, 5))
    first = s.plan()
    assert admitted(first) == ["r0", "r1"]
    assert admitted(s.plan()) == []
    s.finish([i for a in first.admitted for i in a.seq_ids])
    assert admitted(s.plan()) == ["r2", "r3"]
    assert admitted(s.plan()) == []


def test_remove_takes_out_matching_waiting_requests_in_order():
    s = scheduler_with(limits(), *[Demand(1, 5) for _ in range(5)])
    assert s.remove(lambda item: item in {"r1", "r3", "nope"}) == ["r1", "r3"]
    assert s.num_waiting == 3
    assert s.remove(lambda item: False) == []
    assert admitted(s.plan()) == ["r0", "r2", "r4"]
    assert s.num_waiting == 0


def test_the_plan_is_the_whole_step():
    """Each choice gets a sequence id; admitted sequences decode from the next step; a sequence that is done
    leaves at the next step (its row freed first) and decodes no more."""
    s = scheduler_with(limits(), Demand(2, 5), Demand(1, 7))
    first = s.plan()
    assert first.free == [] and first.decode == [] and first.chunk is None
    (a, b) = first.admitted
    assert len(a.seq_ids) == 2 and len(b.seq_ids) == 1 and len({*a.seq_ids, *b.seq_ids}) == 3
    second = s.plan()
    assert second.decode == [*a.seq_ids, *b.seq_ids] and second.free == [] and not second.admitted
    s.finish([a.seq_ids[1]])
    s.finish([12345])  # an id it does not run: ignored
    third = s.plan()
    assert third.free == [a.seq_ids[1]] and third.decode == [a.seq_ids[0], *b.seq_ids]
    s.add("r2", Demand(1, 3))
    fourth = s.plan()
    assert fourth.free == [] and admitted(fourth) == ["r2"] and fourth.decode == third.decode
    s.finish([*a.seq_ids, *b.seq_ids, *fourth.admitted[0].seq_ids])
    last = s.plan()
    assert sorted(last.free) == sorted([a.seq_ids[0], *b.seq_ids, *fourth.admitted[0].seq_ids])
    assert last.decode == [] and not s.has_work


@dataclass(frozen=True)
class Held:
    length: int


def test_what_the_prefix_cache_holds_is_not_computed_and_comes_with_the_plan():
    s = scheduler_with(limits(prefill=100), Demand(1, 150), Demand(1, 70))
    held = {"r0": Held(96), "r1": Held(32)}
    plan = s.plan(lambda item: held.get(item))
    # 150 - 96 = 54 and 70 - 32 = 38 tokens to compute: both fit 100, each with what the cache holds
    assert [(a.item, a.cached) for a in plan.admitted] == [("r0", Held(96)), ("r1", Held(32))]
    s = scheduler_with(limits(prefill=100), Demand(1, 1500))
    chunk = s.plan(lambda item: Held(700)).chunk
    assert chunk is not None and chunk.first and chunk.cached == Held(700) and chunk.start == 700


def staged_chunks(lim: BatchLimits, prompt_len: int, decoding: list[int]) -> list[tuple[int, int]]:
    """The chunks of a staged prompt, one step per entry of `decoding`: how many sequences decode beside it
    then (they run ahead of it; nothing joins while a prompt is staged, so the count only falls)."""
    s: Scheduler[str] = Scheduler(lim)
    for i in range(decoding[0]):
        s.add(f"d{i}", Demand(1, 1))
    s.add("long", Demand(1, prompt_len))
    if decoding[0]:
        assert len(s.plan().admitted) == decoding[0]  # they join; the long prompt waits for the next step
    out = []
    for n in decoding:
        ids = list(s._running)
        s.finish(ids[: len(ids) - n])
        plan = s.plan()
        assert plan.chunk is not None and not plan.admitted and len(plan.decode) == n
        out.append((plan.chunk.start, plan.chunk.end))
    return out


def test_a_long_prompt_goes_in_longer_chunks_while_no_row_decodes():
    idle = BatchLimits(max_batch_size=8, max_batch_tokens=8 * 2048, max_prefill_tokens=100, max_queue_size=8,
                       idle_prefill_tokens=400)
    # alone: chunks of 400; with rows decoding: chunks of 100, so that their streams do not wait long
    assert staged_chunks(idle, 1000, [0, 0, 0]) == [(0, 400), (400, 800), (800, 1000)]
    assert staged_chunks(idle, 350, [3, 3, 3, 3]) == [(0, 100), (100, 200), (200, 300), (300, 350)]
    # the rows beside it finish while the prompt is staged: the chunks grow
    assert staged_chunks(idle, 1000, [2, 1, 0, 0]) == [(0, 100), (100, 200), (200, 600), (600, 1000)]
    # without an idle size the budget holds whatever the batch holds; a smaller idle size never shrinks it
    for lim in (limits(prefill=100), BatchLimits(8, 8 * 2048, 100, 8, idle_prefill_tokens=50)):
        assert staged_chunks(lim, 250, [0, 0, 0]) == [(0, 100), (100, 200), (200, 250)]


def test_a_staged_prompts_choices_decode_after_its_last_chunk():
    s = scheduler_with(limits(prefill=100), Demand(3, 150))
    first = s.plan()
    assert first.chunk is not None and first.chunk.first and not first.chunk.last and first.decode == []
    last = s.plan()
    assert last.chunk is not None and last.chunk.last and last.chunk.seq_ids == first.chunk.seq_ids
    assert s.plan().decode == list(first.chunk.seq_ids) and s.num_running == 3
