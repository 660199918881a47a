"""Engine end to end on the tiny random Falcon: parity with `generate`, batch invariance, n, finish, abort, failure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
import torch

from falcon_service.engine.cuda_graphs import bucket
from falcon_service.engine.engine import (
    ChoiceEvent,
    Engine,
    EngineError,
    GenerationRequest,
    RequestStream,
    SamplingParams,
)
from falcon_service.engine.falcon import FalconRunner
from falcon_service.engine.scheduler import BatchLimits

STREAM_TIMEOUT = 60.0  # a bound on waiting for events, never a speed assertion
ROOMY = BatchLimits(max_batch_size=32, max_batch_tokens=32 * 2048, max_prefill_tokens=4096, max_queue_size=64)

TEXTS = [
    "Hi",
    "The falcon is a bird of prey.",
    "User: what do falcons eat?\nAssistant:",
    "A server batches requests to use the GPU well. Large language models predict the next token, one at a time.",
    "def add(a, b):\n    return a + b\n",
]


@dataclass
class Choice:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    finishes: int = 0


async def collect(events: RequestStream | AsyncIterator[ChoiceEvent], into: dict[int, Choice] | None = None
                  ) -> dict[int, Choice]:
    """All remaining events of a stream, per choice index (a stream that never ends fails the test)."""
    choices = into if into is not None else {}
    async with asyncio.timeout(STREAM_TIMEOUT):
        async for event in events:
            choice = choices.setdefault(event.index, Choice())
            assert choice.finish_reason is None, f"event for choice {event.index} after it finished"
            choice.tokens += event.token_ids
            choice.logprobs += [lp.logprob for lp in event.logprobs]
            choice.text += event.text
            if event.finish_reason is not None:
                choice.finish_reason = event.finish_reason
                choice.finishes += 1
    return choices


async def run_one(engine: Engine, prompt: list[int], params: SamplingParams, n: int = 1) -> dict[int, Choice]:
    return await collect(engine.submit(GenerationRequest(tuple(prompt), params, n)))


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def make_engine(request, tiny_tokenizer):
    """Build engines on a model (the tiny one by default); all are shut down after the test.

    Every engine test runs twice: reading each step's tokens back before the next step (the CPU's
    default), and while the next step runs (a GPU's default), which must not change any result.
    """
    engines: list[Engine] = []
    overlap: bool = request.param
    controlled: list = []  # ControlledModel fixtures (tests/conftest.py)

    def make(model, limits: BatchLimits = ROOMY, **options) -> Engine:
        if hasattr(model, "runner_factory"):  # a ControlledModel
            controlled.append(model)
            # eager forward passes: a replayed CUDA graph would not go through the controlled forward
            engine = Engine(model.inner, tiny_tokenizer, limits, runner_factory=model.runner_factory, overlap=overlap,
                            cuda_graphs=False)
        else:
            engine = Engine(model, tiny_tokenizer, limits, overlap=overlap, **options)
        engines.append(engine)
        return engine

    yield make
    for model in controlled:
        model.running.set()
    for engine in engines:
        engine.shutdown()


@pytest.fixture
def prompts(tiny_tokenizer) -> list[list[int]]:
    ids = [tiny_tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    assert len({len(p) for p in ids}) == len(ids), "prompts should all have different lengths"
    return ids


def decode_rows(model) -> list[int]:
    """Batch rows of every decode step (one new token per row) the controlled model ran."""
    return [rows for rows, new, _ in model.calls if new == 1]


# ---------- parity with transformers ----------


def replaying_capture(replays: list[int]):
    """Stands in for CUDA graph capture on any device: replaying a bucket runs its step function, so
    the buckets, padding rows and output buffer work as around a real graph."""
    def capture(step):
        def replay() -> None:
            replays.append(1)
            step()
        return replay
    return capture


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "bucketed-graph-replay"])
async def test_greedy_matches_generate(make_engine, tiny_model, tiny_tokenizer, prompts, graphs):
    replays: list[int] = []
    engine = make_engine(tiny_model, graph_capture=replaying_capture(replays) if graphs else None)
    max_new = 12
    expected, expected_logprobs = [], []
    for prompt in prompts:
        out = tiny_model.generate(
            torch.tensor([prompt], device=tiny_model.device),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=tiny_model.device),
            max_new_tokens=max_new, do_sample=False, pad_token_id=tiny_tokenizer.eos_token_id,
            output_logits=True, return_dict_in_generate=True,
        )
        tokens = out.sequences[0, len(prompt):].tolist()
        expected.append(tokens)
        expected_logprobs.append([float(lg[0].log_softmax(-1)[t]) for lg, t in zip(out.logits, tokens, strict=True)])
    assert len({tuple(e) for e in expected}) > 1, "the prompts should lead to different outputs"

    params = greedy(max_new, logprobs=0)
    alone = [(await run_one(engine, p, params))[0] for p in prompts]
    together = [c[0] for c in await asyncio.gather(*(run_one(engine, p, params) for p in prompts))]
    for got in (alone, together):
        assert [c.tokens for c in got] == expected
        for choice, want in zip(got, expected_logprobs, strict=True):
            assert choice.logprobs == pytest.approx(want, abs=1e-4)
    if graphs:  # decode steps went through buckets: 1 row alone; 5 rows padded to 8 together
        assert engine.graphs is not None and len(replays) > 2 * (max_new - 1)
        assert {rows for rows, _ in engine.graphs.buckets} >= {1, 8}
        assert engine.step_graphs is not None and engine.step_graphs.captured  # the prefills, by token count


@pytest.mark.parametrize("fused_ops", [False, True], ids=["eager-ops", "fused-ops"])
async def test_mixed_steps_through_token_buckets_match_generate(make_engine, tiny_model, tiny_tokenizer, prompts,
                                                                 fused_ops):
    """Steps that decode and prefill at once (prompts arriving while others decode, a long one in chunks beside
    them) replayed through the captured pieces of their token-count bucket, and decode steps through their graphs'
    buckets, with the small ops eager or fused (`FalconRunner(fused_ops=True)`): greedy equals `generate`."""
    replays: list[int] = []
    limits = BatchLimits(max_batch_size=8, max_batch_tokens=8 * 2048, max_prefill_tokens=24, max_queue_size=16)
    engine = make_engine(tiny_model, limits, graph_capture=replaying_capture(replays),
                         runner_factory=partial(FalconRunner, fused_ops=fused_ops))
    assert engine._runner.fused_ops is fused_ops
    long_prompt = tiny_tokenizer.encode(" ".join(TEXTS), add_special_tokens=False)
    assert len(long_prompt) > 3 * 24
    requests = [(prompts[3], 16), (prompts[1], 12), (long_prompt, 6), (prompts[4], 10), (prompts[0], 9)]
    expected = []
    for prompt, max_new in requests:
        out = tiny_model.generate(torch.tensor([prompt], device=tiny_model.device),
                                  attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=tiny_model.device),
                                  max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                                  pad_token_id=tiny_tokenizer.eos_token_id)
        expected.append(out[0, len(prompt):].tolist())
    pieces = engine.step_graphs
    assert pieces is not None
    mixed: list[tuple[int, int]] = []  # (decode rows, tokens) of each step that prefilled
    forward = pieces.forward

    def recording(batch):
        mixed.append((batch.count, batch.tokens))
        return forward(batch)

    pieces.forward = recording
    tasks = []
    for prompt, max_new in requests:
        stream = engine.submit(GenerationRequest(tuple(prompt), greedy(max_new, ignore_eos=True)))
        tasks.append(asyncio.ensure_future(collect(stream)))
        # the next one arrives once this one decodes (at least 5 more steps): not after a fixed sleep, which a fast
        # step loop could outrun (the first one then done before the second came)
        await wait_for(lambda stream=stream: stream.first_token_at is not None)
    results = await asyncio.gather(*tasks)
    assert [r[0].tokens for r in results] == expected
    assert any(rows > 0 for rows, _ in mixed), "no step decoded and prefilled at once"
    assert len({bucket(tokens, pieces.buckets) for _, tokens in mixed}) >= 2
    assert pieces.captured == {bucket(tokens, pieces.buckets) for _, tokens in mixed}


# ---------- batch invariance ----------


async def test_staggered_greedy_requests_match_running_alone(make_engine, controlled_model, prompts):
    engine = make_engine(controlled_model)
    first = [(prompts[1], 30), (prompts[2], 34), (prompts[0], 38)]
    later = [(prompts[3], 6), (prompts[4], 10), (prompts[0], 14)]

    def params(max_tokens: int) -> SamplingParams:
        return greedy(max_tokens, ignore_eos=True, logprobs=0)

    alone = [(await run_one(engine, p, params(m)))[0] for p, m in first + later]
    controlled_model.calls.clear()

    streams = [engine.submit(GenerationRequest(tuple(p), params(m))) for p, m in first]
    results: list[dict[int, Choice]] = [{} for _ in first + later]
    iterators = [aiter(s) for s in streams]
    for it, res in zip(iterators, results, strict=False):  # every early request is decoding now
        event = await asyncio.wait_for(anext(it), STREAM_TIMEOUT)
        res[0] = Choice(tokens=list(event.token_ids), logprobs=[lp.logprob for lp in event.logprobs], text=event.text)
    controlled_model.running.clear()  # hold the engine so the later requests surely join a running batch
    streams += [engine.submit(GenerationRequest(tuple(p), params(m))) for p, m in later]
    controlled_model.running.set()
    await asyncio.gather(
        *(collect(it, res) for it, res in zip(iterators, results, strict=False)),
        *(collect(s, res) for s, res in zip(streams[len(first):], results[len(first):], strict=True)),
    )

    assert max(decode_rows(controlled_model)) == len(first) + len(later), "the later requests did not join"
    for (prompt, max_tokens), got, want in zip(first + later, results, alone, strict=True):
        assert got[0].tokens == want.tokens, f"prompt of {len(prompt)} tokens differs in a batch"
        assert got[0].text == want.text
        assert got[0].logprobs == pytest.approx(want.logprobs, abs=1e-4)
        assert len(got[0].tokens) == max_tokens and got[0].finish_reason == "length"


async def test_seeded_sampling_does_not_depend_on_the_batch(make_engine, controlled_model, prompts):
    engine = make_engine(controlled_model)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=123, ignore_eos=True)
    alone = (await run_one(engine, prompts[2], seeded))[0].tokens
    # the test means something only if sampling actually departs from greedy and depends on the seed
    assert alone != (await run_one(engine, prompts[2], greedy(12, ignore_eos=True)))[0].tokens
    other_seed = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=124, ignore_eos=True)
    assert alone != (await run_one(engine, prompts[2], other_seed))[0].tokens
    assert alone == (await run_one(engine, prompts[2], seeded))[0].tokens

    others = [
        (prompts[0], SamplingParams(max_tokens=9, temperature=1.0), 1),
        (prompts[1], greedy(15), 1),
        (prompts[3], SamplingParams(max_tokens=7, temperature=0.7, top_k=5, seed=9), 2),
        (prompts[4], SamplingParams(max_tokens=20, temperature=1.3), 1),
        (prompts[2], SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9), 1),
        (prompts[0], SamplingParams(max_tokens=5, temperature=1.0, presence_penalty=1.0, frequency_penalty=0.5), 1),
        (prompts[1], SamplingParams(max_tokens=11, temperature=0.9, repetition_penalty=1.3, seed=123), 1),
        (prompts[3], SamplingParams(max_tokens=13, temperature=1.0, logit_bias={5: 3.0}), 1),
    ]
    controlled_model.calls.clear()
    controlled_model.running.clear()
    tasks = [run_one(engine, p, params, n) for p, params, n in others[:4]]
    tasks.append(run_one(engine, prompts[2], seeded))
    tasks += [run_one(engine, p, params, n) for p, params, n in others[4:]]
    pending = asyncio.gather(*tasks)
    await asyncio.sleep(0)  # let every request be submitted while the engine is held
    controlled_model.running.set()
    results = await pending
    assert max(decode_rows(controlled_model)) >= 9
    assert results[4][0].tokens == alone


# ---------- overlap of host and device work ----------


async def test_overlapped_steps_deliver_a_step_while_the_next_one_runs(tiny_model, tiny_tokenizer, prompts):
    import threading

    from falcon_service.engine.falcon import FalconRunner

    second_pass_started, release = threading.Event(), threading.Event()
    passes = []

    class HeldRunner(FalconRunner):  # holds the second forward pass until the test releases it
        def forward(self, batch):
            passes.append(batch.decode is not None)
            if len(passes) == 2:
                second_pass_started.set()
                release.wait(30)
            return super().forward(batch)

    engine = Engine(tiny_model, tiny_tokenizer, ROOMY, runner_factory=HeldRunner, overlap=True, cuda_graphs=False)
    try:
        stream = aiter(engine.submit(GenerationRequest(tuple(prompts[1]), greedy(4, ignore_eos=True))))
        first = asyncio.ensure_future(anext(stream))
        assert await asyncio.to_thread(second_pass_started.wait, STREAM_TIMEOUT)
        # the prefill's token is read back only after the next step was launched: while that step is
        # held, the client has nothing (a step-by-step engine would have delivered it before it began)
        await asyncio.sleep(0.3)
        assert not first.done()
        release.set()
        events = [await asyncio.wait_for(first, STREAM_TIMEOUT)] + await collect_events(stream)
        assert [len(e.token_ids) for e in events] == [1, 1, 1, 1] and events[-1].finish_reason == "length"
        assert len(passes) == 4, "no forward pass past the last token: it ends by length, known in advance"
    finally:
        release.set()
        engine.shutdown()


async def collect_events(stream) -> list[ChoiceEvent]:
    async with asyncio.timeout(STREAM_TIMEOUT):
        return [event async for event in stream]


# ---------- n choices ----------


async def test_n_choices_stream_separately_and_finish(make_engine, tiny_model, prompts):
    engine = make_engine(tiny_model)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    choices = await run_one(engine, prompts[1], params, n=3)
    assert sorted(choices) == [0, 1, 2]
    for choice in choices.values():
        assert choice.finishes == 1 and choice.finish_reason == "length" and len(choice.tokens) == 8
    assert len({tuple(c.tokens) for c in choices.values()}) == 3, "choices of one seeded request must differ"

    again = await run_one(engine, prompts[1], params, n=3)
    assert {i: c.tokens for i, c in again.items()} == {i: c.tokens for i, c in choices.items()}


async def test_n_choices_at_temperature_zero_are_identical(make_engine, tiny_model, prompts):
    engine = make_engine(tiny_model)
    choices = await run_one(engine, prompts[2], greedy(8), n=3)
    assert sorted(choices) == [0, 1, 2]
    single = (await run_one(engine, prompts[2], greedy(8)))[0]
    for choice in choices.values():
        assert choice.finishes == 1
        assert choice.tokens == single.tokens and choice.text == single.text


# ---------- finish reasons ----------


async def test_max_tokens_finishes_with_length(make_engine, tiny_model, prompts):
    engine = make_engine(tiny_model)
    for max_tokens in (1, 5):
        choice = (await run_one(engine, prompts[1], SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1)))[0]
        assert choice.finish_reason == "length"
        assert len(choice.tokens) == max_tokens


async def test_eos_finishes_with_stop_and_no_text(make_engine, tiny_model, tiny_tokenizer, prompts):
    engine = make_engine(tiny_model)
    eos = tiny_tokenizer.eos_token_id
    choice = (await run_one(engine, prompts[1], greedy(10, logit_bias={eos: 100.0})))[0]
    assert choice.tokens == [eos]
    assert choice.finish_reason == "stop"
    assert choice.text == ""


async def test_ignore_eos_keeps_generating_past_eos(make_engine, tiny_model, tiny_tokenizer, prompts):
    engine = make_engine(tiny_model)
    eos = tiny_tokenizer.eos_token_id
    choice = (await run_one(engine, prompts[1], greedy(6, logit_bias={eos: 100.0}, ignore_eos=True)))[0]
    assert choice.tokens == [eos] * 6
    assert choice.finish_reason == "length"


async def test_stop_string_finishes_with_stop_and_is_trimmed(make_engine, tiny_model, prompts):
    engine = make_engine(tiny_model)
    full = (await run_one(engine, prompts[3], greedy(16, ignore_eos=True)))[0]
    assert len(full.text) >= 6, full.text
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    expected = full.text[: full.text.index(stop)]

    choice = (await run_one(engine, prompts[3], greedy(16, ignore_eos=True, stop=(stop,))))[0]
    assert choice.finish_reason == "stop"
    assert choice.text == expected
    assert stop not in choice.text
    assert len(choice.tokens) < 16
    assert choice.tokens == full.tokens[: len(choice.tokens)]


# ---------- abort ----------


async def test_abort_frees_the_batch_and_the_engine_serves_on(make_engine, controlled_model, prompts):
    engine = make_engine(controlled_model)
    long = SamplingParams(max_tokens=1500, temperature=1.0, ignore_eos=True)
    streams = [engine.submit(GenerationRequest(tuple(p), long, n)) for p, n in zip(prompts[:4], (1, 2, 1, 1),
                                                                                    strict=True)]
    iterators = [aiter(s) for s in streams]
    for it in iterators:
        await asyncio.wait_for(anext(it), STREAM_TIMEOUT)
    controlled_model.running.clear()
    for s in streams:
        s.abort()
    controlled_model.running.set()
    for stream, it in zip(streams, iterators, strict=True):
        await collect(it)
        assert stream.finished
        assert set(stream.finish_reasons.values()) == {"abort"}
        assert stream.completion_tokens < 1500 * stream.request.n

    await wait_for(lambda: engine.stats() == {"running": 0, "waiting": 0, "cache_tokens": 0, "prefix_tokens": 0})
    choice = (await run_one(engine, prompts[0], greedy(4)))[0]
    assert choice.finish_reason == "length" and len(choice.tokens) == 4


async def test_abort_while_waiting_leaves_the_queue(make_engine, tiny_model, prompts):
    engine = make_engine(tiny_model, BatchLimits(max_batch_size=1, max_batch_tokens=4096, max_prefill_tokens=4096,
                                                 max_queue_size=4))
    running = engine.submit(GenerationRequest(tuple(prompts[0]), SamplingParams(max_tokens=1500, ignore_eos=True)))
    it = aiter(running)
    await asyncio.wait_for(anext(it), STREAM_TIMEOUT)
    waiting = engine.submit(GenerationRequest(tuple(prompts[1]), greedy(4)))  # the only row is taken
    assert engine.stats()["waiting"] == 1
    waiting.abort()
    choices = await collect(waiting)
    assert {i: (c.tokens, c.finish_reason) for i, c in choices.items()} == {0: ([], "abort")}
    assert engine.stats()["waiting"] == 0
    running.abort()
    await collect(it)
    assert running.finish_reasons == {0: "abort"}
    await wait_for(lambda: engine.stats() == {"running": 0, "waiting": 0, "cache_tokens": 0, "prefix_tokens": 0})


# ---------- failures ----------


async def test_failing_forward_fails_the_running_streams_only_then_serves(make_engine, controlled_model, prompts):
    engine = make_engine(controlled_model)
    long = SamplingParams(max_tokens=1500, temperature=1.0, ignore_eos=True)
    streams = [engine.submit(GenerationRequest(tuple(p), long)) for p in prompts[:3]]
    iterators = [aiter(s) for s in streams]
    for it in iterators:
        await asyncio.wait_for(anext(it), STREAM_TIMEOUT)
    controlled_model.running.clear()
    controlled_model.fail = True
    controlled_model.running.set()
    for it in iterators:
        with pytest.raises(EngineError):
            await collect(it)
    await wait_for(lambda: engine.stats() == {"running": 0, "waiting": 0, "cache_tokens": 0, "prefix_tokens": 0})

    controlled_model.fail = False
    choices = await asyncio.gather(*(run_one(engine, p, greedy(5)) for p in prompts[:2]))
    assert [c[0].finish_reason for c in choices] == ["length", "length"]
    assert [len(c[0].tokens) for c in choices] == [5, 5]


async def test_failing_prefill_fails_the_new_request(make_engine, controlled_model, prompts):
    engine = make_engine(controlled_model)
    controlled_model.fail = True
    with pytest.raises(EngineError):
        await run_one(engine, prompts[1], greedy(5), n=2)
    controlled_model.fail = False
    choice = (await run_one(engine, prompts[1], greedy(5)))[0]
    assert choice.finish_reason == "length" and len(choice.tokens) == 5


# ---------- limits ----------


async def _run_sampling_stats(engine: Engine, requests: list[tuple[list[int], SamplingParams]]
                              ) -> tuple[list[dict[int, Choice]], list[dict[str, int]]]:
    seen: list[dict[str, int]] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen.append(engine.stats())
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(run_one(engine, p, params) for p, params in requests))
    finally:
        done.set()
        await watcher
    return results, seen


async def test_max_batch_size_bounds_the_running_batch(make_engine, controlled_model, prompts):
    limits = BatchLimits(max_batch_size=2, max_batch_tokens=32 * 2048, max_prefill_tokens=4096, max_queue_size=16)
    engine = make_engine(controlled_model, limits)
    requests = [(p, greedy(8 + i, ignore_eos=True)) for i, p in enumerate(prompts)]
    results, seen = await _run_sampling_stats(engine, requests)

    for (_, params), res in zip(requests, results, strict=True):
        assert res[0].finish_reason == "length" and len(res[0].tokens) == params.max_tokens
    assert seen and max(s["running"] for s in seen) <= 2
    assert max(rows for rows, _, _ in controlled_model.calls) <= 2
    assert max(decode_rows(controlled_model)) == 2, "two requests should have decoded together"


async def test_kv_token_budget_bounds_the_running_batch(make_engine, controlled_model, tiny_tokenizer):
    prompt = tiny_tokenizer.encode("The falcon is a bird of prey.", add_special_tokens=False)
    max_tokens = 10
    # every sequence reserves a whole context (2048 tokens): room for two sequences, not three
    budget = 3 * 2048 - 1
    limits = BatchLimits(max_batch_size=16, max_batch_tokens=budget, max_prefill_tokens=4096, max_queue_size=16)
    engine = make_engine(controlled_model, limits)
    results, seen = await _run_sampling_stats(engine, [(prompt, greedy(max_tokens, ignore_eos=True))] * 5)

    assert all(r[0].finish_reason == "length" and len(r[0].tokens) == max_tokens for r in results)
    assert max(s["running"] for s in seen) <= 2
    assert max(s["cache_tokens"] for s in seen) <= budget
    assert all(rows <= 2 for rows, _, _ in controlled_model.calls)
    assert max(decode_rows(controlled_model)) == 2


async def test_more_choices_than_cache_rows_is_refused_at_submit(make_engine, tiny_model, prompts):
    limits = BatchLimits(max_batch_size=2, max_batch_tokens=32 * 2048, max_prefill_tokens=4096, max_queue_size=16)
    engine = make_engine(tiny_model, limits)
    with pytest.raises(ValueError, match="n=3"):
        engine.submit(GenerationRequest(tuple(prompts[0]), greedy(4), n=3))
    assert engine.stats()["waiting"] == 0


async def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(make_engine, controlled_model, tiny_model,
                                                                        tiny_tokenizer, prompts):
    chunk = 16
    limits = BatchLimits(max_batch_size=4, max_batch_tokens=32 * 2048, max_prefill_tokens=chunk, max_queue_size=16)
    engine = make_engine(controlled_model, limits)
    long_prompt = tiny_tokenizer.encode(" ".join(TEXTS) * 2, add_special_tokens=False)
    assert len(long_prompt) > 4 * chunk
    expected = tiny_model.generate(torch.tensor([long_prompt], device=tiny_model.device),
                                   attention_mask=torch.ones(1, len(long_prompt), dtype=torch.long,
                                                             device=tiny_model.device),
                                   max_new_tokens=6, do_sample=False)[0, len(long_prompt):]

    decoding = engine.submit(GenerationRequest(tuple(prompts[1]), greedy(200, ignore_eos=True)))
    it = aiter(decoding)
    await asyncio.wait_for(anext(it), STREAM_TIMEOUT)
    controlled_model.calls.clear()
    long = await run_one(engine, long_prompt, greedy(6, ignore_eos=True), n=2)
    decoding.abort()
    await collect(it)

    assert long[0].tokens == long[1].tokens == expected.tolist()
    chunks = [(rows, new) for rows, new, _ in controlled_model.calls if new > 1 or (rows == 1 and new != 1)]
    assert all(new <= chunk for _, new in chunks), controlled_model.calls
    assert len([c for c in controlled_model.calls if c[1] > 1]) >= len(long_prompt) // chunk
    # the running request kept decoding while the long prompt was prefilled: a decode step after each chunk
    kinds = ["prefill" if new > 1 else "decode" for _, new, _ in controlled_model.calls]
    first_prefill, last_prefill = kinds.index("prefill"), len(kinds) - 1 - kinds[::-1].index("prefill")
    between = kinds[first_prefill:last_prefill + 1]
    assert between.count("decode") >= between.count("prefill") - 1


# ---------- liveness ----------


async def test_the_engine_is_not_alive_after_failed_steps_in_a_row_or_a_stall(make_engine, controlled_model, prompts):
    engine = make_engine(controlled_model)
    assert engine.alive() == (True, "ok")
    assert (await run_one(engine, prompts[0], greedy(2)))[0].finish_reason == "length"
    controlled_model.fail = True
    for failed in (1, 2, 3):
        with pytest.raises(EngineError):
            await run_one(engine, prompts[0], greedy(2))
        assert engine.alive()[0] == (failed < 3)
    assert engine.alive() == (False, "3 generation steps failed in a row")
    controlled_model.fail = False
    await run_one(engine, prompts[0], greedy(2))  # a good step: alive again
    assert engine.alive() == (True, "ok")
    # a step that never ends while there is work: alive until the stall time, then not
    controlled_model.running.clear()
    stream = engine.submit(GenerationRequest(tuple(prompts[0]), greedy(2)))
    await asyncio.sleep(0.3)
    assert engine.alive(stall_seconds=5)[0]
    alive, why = engine.alive(stall_seconds=0.2)
    assert not alive and "finished no step" in why
    controlled_model.running.set()
    await collect(stream)
    assert engine.alive(stall_seconds=0.2) == (True, "ok"), "idle is not stalled"
