"""Prefix caching: the index of the rows' prefixes, the batch reusing them, and the engine's output
unchanged by them (greedy and seeded), with usage counting the reused tokens."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import os
import random

import pytest
import torch
from rows_driver import RowsDriver

from falcon_service.engine import prefix_cache
from falcon_service.engine.engine import Engine, GenerationRequest, SamplingParams
from falcon_service.engine.falcon import FalconRunner
from falcon_service.engine.prefix_cache import BLOCK, PrefixCache
from falcon_service.engine.scheduler import BatchLimits

TEST_DEVICE = os.environ.get("FALCON_TEST_DEVICE", "cpu")  # see tests/conftest.py
ATOL = 1e-4
TIMEOUT = 60.0


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]


# ---------- the index ----------


def test_lookup_finds_the_longest_cached_prefix_in_whole_blocks_and_never_the_whole_prompt():
    cache = PrefixCache()
    shared = tokens(3 * BLOCK + 5, seed=1)
    cache.put(0, shared[: 2 * BLOCK + 3])  # two whole blocks
    cache.put(1, shared)  # three whole blocks
    prompt = [*shared, *tokens(10, seed=2)]
    match = cache.lookup(prompt)
    assert match is not None and match.prefix.row == 1 and match.length == 3 * BLOCK
    # a prompt that is exactly a cached prefix still computes its last token (its logits are needed)
    exact = cache.lookup(shared[: 3 * BLOCK])
    assert exact is not None and exact.length == 2 * BLOCK
    # one different token in the second block: only the first block matches
    other = list(prompt)
    other[BLOCK + 4] += 1
    match = cache.lookup(other)
    assert match is not None and match.length == BLOCK
    assert cache.lookup(tokens(40, seed=3)) is None
    assert cache.lookup(shared[: BLOCK]) is None  # shorter than a block plus the token to compute


def test_a_hash_collision_is_a_miss_never_a_wrong_prefix(monkeypatch):
    monkeypatch.setattr(prefix_cache, "hash", lambda _: 7, raising=False)  # every block key collides
    cache = PrefixCache()
    cache.put(0, tokens(40, seed=1))
    assert cache.lookup(tokens(40, seed=2)) is None
    same = cache.lookup([*tokens(40, seed=1), 5])
    assert same is not None and same.length == 2 * BLOCK


def test_a_salted_prefix_is_found_only_under_its_salt():
    cache = PrefixCache()
    shared = tokens(3 * BLOCK, seed=1)
    alice, bob = prefix_cache.salt_key("alice"), prefix_cache.salt_key("bob")
    cache.put(0, shared, alice)
    prompt = [*shared, 1]
    assert cache.lookup(prompt) is None and cache.lookup(prompt, bob) is None
    match = cache.lookup(prompt, alice)
    assert match is not None and match.length == 3 * BLOCK
    cache.put(1, shared)  # the same tokens unsalted: a prefix of its own
    unsalted = cache.lookup(prompt)
    assert unsalted is not None and unsalted.prefix.row == 1


async def test_requests_share_cached_prefixes_only_with_their_own_salt(tiny_model, tiny_tokenizer):
    """A secret in a prompt: a caller with another salt who guesses it right gets no more cached tokens than
    one who guesses wrong, none (so `cached_tokens` tells nothing); the same salt reuses the prefix."""
    secret = tokens(3 * BLOCK, seed=7)
    wrong = [*secret[: BLOCK + 3], 999, *secret[BLOCK + 4:]]
    engine = Engine(tiny_model, tiny_tokenizer, LIMITS, prefix_caching=True)

    async def cached(prompt: list[int], salt: str | None) -> int:
        stream = engine.submit(GenerationRequest((*prompt, 5, 6), SamplingParams(max_tokens=2), cache_salt=salt))
        await collect(stream)
        return stream.cached_tokens

    try:
        assert await cached(secret, "alice") == 0
        assert await cached(secret, "mallory") == 0  # the right guess, under another salt: nothing of alice's
        assert await cached(wrong, "eve") == 0
        assert await cached(secret, None) == 0
        assert await cached(secret, "alice") >= 3 * BLOCK - BLOCK
    finally:
        engine.shutdown()


def test_moves_and_drops_keep_the_index_exact():
    cache = PrefixCache()
    a, b = tokens(2 * BLOCK, seed=1), tokens(3 * BLOCK, seed=2)
    cache.put(0, a)
    cache.put(1, b)
    assert cache.indexed_blocks == 5
    cache.move(1, 4)
    match = cache.lookup([*b, 1])
    assert match is not None and match.prefix.row == 4 and cache.get(1) is None
    cache.move(4, 0)  # over row 0: its prefix is gone
    assert cache.lookup([*a, 1]) is None and cache.indexed_blocks == 3
    cache.drop(0)
    assert cache.indexed_blocks == 0 and len(cache) == 0


def test_least_recently_used_is_the_one_looked_up_longest_ago():
    cache = PrefixCache()
    for row in range(3):
        cache.put(row, tokens(BLOCK + 1, seed=row))
    cache.lookup([*tokens(BLOCK + 1, seed=0), 9])  # row 0 used again
    assert cache.least_recently_used([0, 1, 2]) == 1


# ---------- the batch ----------


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids], device=model.device)).logits[0, -1]


def test_a_reused_prefix_gives_the_logits_of_computing_it(tiny_model):
    runner = FalconRunner(tiny_model, batch_rows=3, max_len=128, pool_rows=5)
    batch = RowsDriver(runner, prefix_caching=True)
    system = tokens(2 * BLOCK + 3, seed=1)
    calls = []
    original = runner.forward

    def counting(step):
        calls.append(([s.start for s in step.segments], [len(s.tokens) for s in step.segments]))
        return original(step)

    runner.forward = counting
    first = [*system, *tokens(7, seed=2)]
    batch.add([first], [1])
    second = [*system, *tokens(9, seed=3)]
    match = batch.lookup(second)
    assert match is not None and match.length == 2 * BLOCK  # from the running row
    logits = batch.add([second], [1], [match])
    assert calls[-1] == ([2 * BLOCK], [len(second) - 2 * BLOCK])  # only the rest was computed
    torch.testing.assert_close(logits[0], reference_logits(tiny_model, second), atol=ATOL, rtol=0)
    # both leave; the second's prefix is kept in an idle row; a third prompt reuses it from there
    batch.remove([0, 1], keep={0: (first, 0), 1: (second, 0)})
    assert batch.size == 0 and sorted(batch.idle.values()) == [len(first), len(second)]
    third = [*second, *tokens(4, seed=4)]
    match = batch.lookup(third)
    assert match is not None and match.prefix.row in batch.idle and match.length == (len(second) // BLOCK) * BLOCK
    logits = batch.add([third], [2], [match])  # two choices share it
    for row in range(2):
        torch.testing.assert_close(logits[row], reference_logits(tiny_model, third), atol=ATOL, rtol=0)
    step = batch.step([5, 6])
    torch.testing.assert_close(step[1], reference_logits(tiny_model, [*third, 6]), atol=ATOL, rtol=0)


def test_idle_rows_give_way_least_recently_used_first_and_running_rows_never(tiny_model):
    runner = FalconRunner(tiny_model, batch_rows=3, max_len=64, pool_rows=4)
    batch = RowsDriver(runner, prefix_caching=True)
    prompts = [tokens(BLOCK + 4, seed=s) for s in range(6)]
    batch.add(prompts[:3], [1, 1, 1])
    batch.remove([0, 1, 2], keep={i: (prompts[i], 0) for i in range(3)})
    assert len(batch.idle) == 3  # rows 1..3 of the pool (the top first)
    batch.lookup([*prompts[2], 1])  # prompt 2 used again: 0 and 1 are older
    batch.add(prompts[3:6], [1, 1, 1])  # three running rows: the pool keeps only one idle row
    assert batch.size == 3 and len(batch.idle) == 1
    kept = batch.lookup([*prompts[2], 1])
    assert kept is not None and kept.prefix.row == 3, "the most recently used prefix is the one kept"
    assert batch.lookup([*prompts[0], 1]) is None and batch.lookup([*prompts[1], 1]) is None
    for i in range(3):  # the running rows' own prefixes are all there
        match = batch.lookup([*prompts[3 + i], 1])
        assert match is not None and match.prefix.row < batch.size and match.prefix.row not in batch.idle
    # a fourth running row cannot be had: the batch is full
    with pytest.raises(RuntimeError, match="full"):
        batch.add([prompts[0]], [1])


# ---------- the engine ----------


async def collect(stream) -> list[int]:
    out: list[int] = []
    async with asyncio.timeout(TIMEOUT):
        async for event in stream:
            out += event.token_ids
    return out


LIMITS = BatchLimits(max_batch_size=6, max_batch_tokens=12 * 2048, max_prefill_tokens=4096, max_queue_size=64)


@pytest.mark.parametrize("chunk", [4096, 24], ids=["whole", "chunked"])
async def test_output_is_the_same_with_and_without_the_cache(tiny_model, tiny_tokenizer, chunk):
    system = tokens(3 * BLOCK + 2, seed=10)
    # suffixes longer than a chunk: with the cache, the rest of a prompt is still prefilled in chunks
    prompts = [[*system, *tokens(30 + i, seed=20 + i)] for i in range(5)]
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)]
    limits = BatchLimits(6, 12 * 2048, chunk, 64)
    staged_starts: list[int] = []
    results = {}
    for caching in (False, True):
        engine = Engine(tiny_model, tiny_tokenizer, limits, prefix_caching=caching)
        stage = engine._batch.rows.stage

        def recording(chunk, offset, match=None, stage=stage):
            if match is not None:
                staged_starts.append(offset)
            return stage(chunk, offset, match)

        engine._batch.rows.stage = recording
        try:
            got, cached = [], []
            for p in params:
                first = engine.submit(GenerationRequest(tuple(prompts[0]), p))
                got.append(await collect(first))  # computes the system prompt
                cached.append(first.cached_tokens)
                streams = [engine.submit(GenerationRequest(tuple(q), p, n=2)) for q in prompts[1:]]
                got += await asyncio.gather(*(collect(s) for s in streams))
                cached += [s.cached_tokens for s in streams]
            results[caching] = (got, cached)
        finally:
            engine.shutdown()
    assert results[True][0] == results[False][0]
    assert results[False][1] == [0] * 10
    assert results[True][1][0] == 0 and all(c >= 3 * BLOCK for c in results[True][1][1:5])
    if chunk < 4096:  # long rests were staged, their first chunk after the cached start
        assert staged_starts and all(start >= 3 * BLOCK for start in staged_starts)


def _settled_rss_bytes() -> int:
    """Resident memory after collecting garbage and handing freed heap pages back (glibc's malloc_trim)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_a_soak_of_random_prefixes_evicts_idle_rows_and_memory_stays_flat(tiny_model, tiny_tokenizer):
    """1,002 requests after a warm-up, each with a prompt never seen before, so idle rows are evicted all
    the time. Prompt lengths come from a few values, one per wave: torch keeps kernels per tensor shape
    (measured: with lengths drawn from 20..129 the process grows until every shape has been seen, and is
    flat when shapes repeat), and that growth says nothing of ours. (A step's tokens are one flat batch, the
    sum of its prompts' lengths: lengths mixed within a wave make ~80 sums, more than the warm-up sees.)"""
    engine = Engine(tiny_model, tiny_tokenizer, LIMITS, prefix_caching=True)
    # as the service does (engine/loader.py): on a GPU every decode graph is captured before serving. (Captured
    # lazily, in the middle of this test, a capture failed once on an H200: see the GPU check's notes.)
    engine.capture_graphs()
    try:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        rng = random.Random(0)
        marks: dict[int, tuple[int, int]] = {}
        for wave in range(217):  # 6 at a time: 300 to warm up, then 1,002
            length = rng.choice([20, 50, 90, 129])
            prompts = [tokens(length, seed=wave * 100 + i) for i in range(6)]
            streams = [engine.submit(GenerationRequest(tuple(p), params)) for p in prompts]
            await asyncio.gather(*(collect(s) for s in streams))
            if wave in (49, 216):
                marks[wave] = (_settled_rss_bytes(), len(gc.get_objects()))
        async with asyncio.timeout(TIMEOUT):
            while engine.stats()["running"]:  # the last wave's rows leave at the end of its step
                await asyncio.sleep(0.01)
        batch = engine._batch.rows  # white box: what the index holds after 1,302 prefixes
        assert batch.prefixes is not None
        assert len(batch.idle) <= 12 and len(batch.prefixes) <= 12  # the pool's rows, nothing more
        assert batch.prefixes.indexed_blocks <= 12 * (129 + 3) // BLOCK
        assert engine.stats()["prefix_tokens"] == batch.idle_tokens > 0
        (rss_warm, objects_warm), (rss_end, objects_end) = marks[49], marks[216]
        # no per-request state survives (Python objects), and the process does not grow (16 KiB a request)
        assert objects_end - objects_warm < 2_000, (objects_warm, objects_end)
        assert rss_end - rss_warm < 16 * 2**20, (rss_warm, rss_end)
    finally:
        engine.shutdown()


# ---------- rows that share a prefix attend to it together ----------


def test_attention_with_log_sum_exp_fused_and_plain():
    from falcon_service.engine.falcon import fused_attention_with_lse, plain_attention_with_lse

    g = torch.Generator().manual_seed(1)
    q, keys, values = (torch.randn(3, 4, 8, generator=g), torch.randn(3, 7, 8, generator=g),
                       torch.randn(3, 7, 8, generator=g))
    bias = torch.zeros(3, 1, 7)
    bias[1, 0, 5:] = float("-inf")
    scores = q @ keys.transpose(1, 2) * 0.5 + bias
    for fn in (fused_attention_with_lse, plain_attention_with_lse):
        out, lse = fn(q, keys, values, bias, 0.5)
        torch.testing.assert_close(out, scores.softmax(-1) @ values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, scores.logsumexp(-1, keepdim=True), atol=1e-5, rtol=1e-5)
        out, lse = fn(q, keys, values, None, 0.5)
        plain = q @ keys.transpose(1, 2) * 0.5
        torch.testing.assert_close(out, plain.softmax(-1) @ values, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, plain.logsumexp(-1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_cascade_attention_is_the_softmax_over_both_parts():
    from falcon_service.engine.falcon import cascade_attention

    g = torch.Generator().manual_seed(0)
    rows, queries, dim, shared, own = 3, 5, 16, 40, 9
    q = torch.randn(rows, queries, dim, generator=g)
    shared_k, shared_v = torch.randn(shared, dim, generator=g), torch.randn(shared, dim, generator=g)
    own_k, own_v = torch.randn(rows, own, dim, generator=g), torch.randn(rows, own, dim, generator=g)
    bias = torch.zeros(rows, 1, own)
    bias[0, 0, 6:] = float("-inf")  # row 0 has only 6 tokens of its own
    got = cascade_attention(q, shared_k, shared_v, own_k, own_v, bias, 0.25)
    keys = torch.cat([shared_k.expand(rows, -1, -1), own_k], dim=1)
    values = torch.cat([shared_v.expand(rows, -1, -1), own_v], dim=1)
    scores = q @ keys.transpose(1, 2) * 0.25 + torch.cat([torch.zeros(rows, 1, shared), bias], dim=-1)
    torch.testing.assert_close(got, scores.softmax(-1) @ values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_stranger", [True, False], ids=["some-rows-share", "all-rows-share"])
def test_decode_rows_sharing_a_prefix_give_the_logits_of_each_alone(tiny_model, with_stranger):
    runner = FalconRunner(tiny_model, batch_rows=6, max_len=256, pool_rows=8)
    batch = RowsDriver(runner, prefix_caching=True)
    system = tokens(6 * BLOCK, seed=7)
    first = [*system, *tokens(5, seed=8)]
    batch.add([first], [1])
    others = [[*system, *tokens(3 + i, seed=9 + i)] for i in range(3)]
    strangers = [tokens(30, seed=20)] if with_stranger else []
    batch.add([*others, *strangers], [1, 2, 1, *[1] * len(strangers)],
              [batch.lookup(p) for p in others] + [None] * len(strangers))
    seqs = [first, others[0], others[1], others[1], others[2], *strangers]
    shared = batch.shared_prefix()
    assert shared is not None and shared.length == 6 * BLOCK and sorted(shared.rows) == [0, 1, 2, 3, 4]
    calls = []
    original = runner.forward

    def recording(step):
        calls.append(step.decode.shared if step.decode is not None else None)
        return original(step)

    runner.forward = recording
    fed = [5, 6, 7, 8, 9, 10][: len(seqs)]
    logits = batch.step(fed)
    assert calls and calls[0] is not None, "the rows did not attend to their prefix together"
    for row, (prompt, token) in enumerate(zip(seqs, fed, strict=True)):
        torch.testing.assert_close(logits[row], reference_logits(tiny_model, [*prompt, token]), atol=ATOL, rtol=0)


def test_a_prefix_planned_for_a_prompt_survives_the_steps_frees(tiny_model):
    """The plan looks a prompt's prefix up before the step frees the rows of sequences that ended: the prefix
    held by a row that leaves (kept in an idle row) or by an idle row that freeing would evict is still there
    when the prompt is placed: only the rest is computed. (Matches made invalid this way cost a whole prefill
    of the prompt in one step, far over the budget: 0.6 s steps on the `small` preset.)"""
    runner = FalconRunner(tiny_model, batch_rows=3, max_len=128, pool_rows=3)
    batch = RowsDriver(runner, prefix_caching=True)
    system = tokens(3 * BLOCK + 3, seed=1)
    first = [*system, *tokens(5, seed=2)]
    batch.add([first], [1])
    calls = []
    original = runner.forward

    def counting(step):
        calls.append([len(s.tokens) for s in step.segments])
        return original(step)

    runner.forward = counting
    second = [*system, *tokens(6, seed=3)]
    match = batch.lookup(second)  # held by the running row of `first`, which leaves at this step
    assert match is not None and match.length == 3 * BLOCK and match.prefix.row == 0
    first_id = batch.batch.ids[0]
    batch.batch.free([first_id], {first_id: ([*first, 9], 0)}, [match])
    logits = batch.add([second], [1], [match])
    assert calls[-1] == [len(second) - 3 * BLOCK]  # only the rest: the match held through the free
    torch.testing.assert_close(logits[0], reference_logits(tiny_model, second), atol=ATOL, rtol=0)
    # a full pool: freeing a row evicts an idle one to keep its own prefix, but not the one this step planned with
    runner = FalconRunner(tiny_model, batch_rows=2, max_len=128, pool_rows=2)
    batch = RowsDriver(runner, prefix_caching=True)
    held = [*tokens(3 * BLOCK, seed=6), 1]
    batch.add([held], [1])
    batch.remove([0], keep={0: (held, 0)})  # kept in the top row
    batch.add([tokens(40, seed=5)], [1])  # a stranger runs in row 0: the pool is full
    third = [*held[:-1], *tokens(7, seed=4)]
    match = batch.lookup(third)
    assert match is not None and match.prefix.row == 1 and 1 in batch.idle
    stranger = batch.batch.ids[0]
    batch.batch.free([stranger], {stranger: (tokens(41, seed=5), 0)}, [match])  # its keep must not evict it
    calls.clear()
    runner.forward = _counting(runner, calls)
    logits = batch.add([third], [1], [match])
    assert calls[-1] == [len(third) - 3 * BLOCK]
    torch.testing.assert_close(logits[0], reference_logits(tiny_model, third), atol=ATOL, rtol=0)


def _counting(runner, calls):
    original = runner.forward

    def counting(step):
        calls.append([len(s.tokens) for s in step.segments])
        return original(step)
    return counting
