"""FalconRunner and KVRows: the lean forward over a per-row KV cache computes what transformers computes,
whatever the other rows hold, through staggered adds, removals, shared prefills and steps that decode and
prefill in one pass (the rows driven as the engine drives them: rows_driver.py)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from rows_driver import RowsDriver

from falcon_service.engine.falcon import FalconRunner, UnsupportedModelError, check_architecture, make_linear

ATOL = 1e-4  # float32, on the CPU and on CUDA (without TF32)
TEST_DEVICE = os.environ.get("FALCON_TEST_DEVICE", "cpu")  # see tests/conftest.py


def reference_logits(model, tokens: list[int]) -> torch.Tensor:
    """transformers' next-token logits after `tokens`, computed alone."""
    with torch.inference_mode():
        return model(torch.tensor([tokens], device=model.device)).logits[0, -1]


@pytest.fixture
def runner(tiny_model) -> FalconRunner:
    return FalconRunner(tiny_model, batch_rows=7, max_len=tiny_model.config.max_position_embeddings)


@pytest.fixture
def texts(tiny_tokenizer) -> list[list[int]]:
    ids = [tiny_tokenizer.encode(t) for t in ("Hello falcon", "The quick brown fox jumps over the lazy dog",
                                              "日本語のテキスト and more", "x")]
    assert len({len(i) for i in ids}) == len(ids)
    return ids


def test_prefill_of_padded_prompts_matches_each_prompt_alone(runner, tiny_model, texts):
    logits = runner.prefill(list(range(len(texts))), texts, [0] * len(texts))
    for row, tokens in enumerate(texts):
        torch.testing.assert_close(logits[row], reference_logits(tiny_model, tokens), atol=ATOL, rtol=0)


def test_chunked_prefill_equals_whole_prefill(runner, tiny_model, texts):
    tokens = texts[1]
    runner.prefill([3], [tokens[:3]], [0])
    runner.prefill([3], [tokens[3:6]], [3])
    logits = runner.prefill([3], [tokens[6:]], [6])
    torch.testing.assert_close(logits[0], reference_logits(tiny_model, tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("cut", [[3, 5, 2], [4, 4, 4], [0, 3, 5]], ids=["unequal-cached", "equal-cached", "one-fresh"])
def test_chunks_after_cached_tokens_of_several_rows_in_one_pass(runner, tiny_model, texts, cut):
    """Rows continuing after what they cache (as after a prefix-cache hit), prefilled together: on a CPU their
    attention runs in two parts (the cached tokens, then the chunk) merged by log-sum-exps."""
    prompts = texts[:3]
    assert all(len(p) > c for p, c in zip(prompts, cut, strict=True))
    first = [(row, p[:c]) for row, (p, c) in enumerate(zip(prompts, cut, strict=True)) if c]
    runner.prefill([r for r, _ in first], [c for _, c in first], [0] * len(first))
    logits = runner.prefill([0, 1, 2], [p[c:] for p, c in zip(prompts, cut, strict=True)], cut)
    for row, tokens in enumerate(prompts):
        torch.testing.assert_close(logits[row], reference_logits(tiny_model, tokens), atol=ATOL, rtol=0)


def test_staggered_adds_steps_and_removals_match_each_sequence_alone(runner, tiny_model, texts):
    batch = RowsDriver(runner)
    seqs: list[list[int]] = []  # row i's tokens so far (prompt + fed tokens)

    def feed(logits: torch.Tensor) -> None:
        for row, tokens in enumerate(seqs):
            torch.testing.assert_close(logits[row], reference_logits(tiny_model, tokens), atol=ATOL, rtol=0)
        nxt = logits.argmax(-1).tolist()
        for tokens, t in zip(seqs, nxt, strict=True):
            tokens.append(t)

    first = batch.add(texts[:2], [1, 1])
    seqs += [list(texts[0]), list(texts[1])]
    for row, tokens in enumerate(seqs):
        torch.testing.assert_close(first[row], reference_logits(tiny_model, tokens), atol=ATOL, rtol=0)
    seqs = [[*s, int(first[i].argmax())] for i, s in enumerate(seqs)]
    for _ in range(3):
        feed(batch.step([s[-1] for s in seqs]))
    # a longer and a shorter prompt join a running batch
    added = batch.add([texts[2], texts[3]], [1, 1])
    seqs += [[*list(texts[2]), int(added[0].argmax())], [*list(texts[3]), int(added[1].argmax())]]
    feed(batch.step([s[-1] for s in seqs]))
    # row 0 leaves: the last row moves into its place
    order = batch.remove([0])
    assert order == [3, 1, 2]
    seqs = [seqs[i] for i in order]
    assert batch.size == 3 and batch.lengths == [len(s) - 1 for s in seqs]
    for _ in range(3):
        feed(batch.step([s[-1] for s in seqs]))
    assert batch.cache_tokens == sum(len(s) - 1 for s in seqs)
    order = batch.remove([0, 2])
    assert order == [1]
    assert batch.size == 1 and batch.cache_tokens == len(seqs[1]) - 1


def test_n_choices_share_one_prefill(runner, tiny_model, texts):
    calls = []
    original = runner.forward

    def counting(batch):
        calls.append([s.row for s in batch.segments])
        return original(batch)

    runner.forward = counting
    batch = RowsDriver(runner)
    logits = batch.add([texts[0], texts[1]], [3, 1])
    assert calls == [[0, 3]]  # one prefill row per prompt
    assert batch.size == 4 and batch.lengths == [len(texts[0])] * 3 + [len(texts[1])]
    for row in range(3):
        torch.testing.assert_close(logits[row], logits[0])
    # the copies are real cache rows: all three decode the same token to the same logits
    step = batch.step([5, 5, 5, 7])
    expected = reference_logits(tiny_model, [*texts[0], 5])
    for row in range(3):
        torch.testing.assert_close(step[row], expected, atol=ATOL, rtol=0)


def test_batch_refuses_more_rows_than_the_cache_has(runner, texts):
    batch = RowsDriver(runner)
    assert batch.capacity == runner.batch_rows == 7  # the staging and scratch rows come after them
    batch.add([texts[0]], [7])
    with pytest.raises(RuntimeError, match="full"):
        batch.add([texts[1]], [1])


def test_prepacked_linear_equals_the_plain_one():
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 64), torch.randn(96)
    x = torch.randn(5, 64)
    torch.testing.assert_close(make_linear(weight, bias)(x), F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(make_linear(weight, None)(x[None]), F.linear(x[None], weight), atol=1e-5, rtol=1e-5)


def test_other_falcon_architectures_are_refused(tiny_model):
    config = tiny_model.config.__class__(**{**tiny_model.config.to_dict(), "new_decoder_architecture": True})
    with pytest.raises(UnsupportedModelError, match="new_decoder_architecture"):
        check_architecture(config)


def test_a_staged_prompt_joins_a_running_batch(runner, tiny_model, texts):
    batch = RowsDriver(runner)
    batch.add([texts[0]], [1])
    running = [*texts[0], 9]
    long = texts[1]
    batch.stage(long[:4], 0)
    batch.step([9])  # the batch decodes between chunks
    running.append(11)
    logits = batch.stage(long[4:], 4, prompt=long, repeats=2)
    for row in range(2):
        torch.testing.assert_close(logits[row], reference_logits(tiny_model, long), atol=ATOL, rtol=0)
    assert batch.size == 3 and batch.lengths == [len(running) - 1, len(long), len(long)]
    step = batch.step([11, 3, 4])
    torch.testing.assert_close(step[0], reference_logits(tiny_model, running), atol=ATOL, rtol=0)
    torch.testing.assert_close(step[1], reference_logits(tiny_model, [*long, 3]), atol=ATOL, rtol=0)
    torch.testing.assert_close(step[2], reference_logits(tiny_model, [*long, 4]), atol=ATOL, rtol=0)


def test_a_staged_chunk_decodes_in_the_same_pass_as_the_running_rows(runner, tiny_model, texts):
    """A long prompt's chunk and the running rows' decode step are one pass (one forward), and equal each alone."""
    batch = RowsDriver(runner)
    first = batch.add([texts[0]], [1])
    running = [*texts[0], int(first[0].argmax())]
    long = texts[1]
    calls = []
    original = runner.forward

    def counting(step):
        calls.append((step.decode is not None, [(s.row, s.start, len(s.tokens)) for s in step.segments]))
        return original(step)

    runner.forward = counting
    batch.stage(long[:4], 0, decode_tokens=[running[-1]])
    running.append(7)
    logits = batch.stage(long[4:], 4, decode_tokens=[7], prompt=long)
    assert calls == [(True, [(runner.cache.staging_row, 0, 4)]), (True, [(runner.cache.staging_row, 4, len(long) - 4)])]
    torch.testing.assert_close(logits[0], reference_logits(tiny_model, long), atol=ATOL, rtol=0)
    step = batch.step([5, 6])
    torch.testing.assert_close(step[0], reference_logits(tiny_model, [*running, 5]), atol=ATOL, rtol=0)
    torch.testing.assert_close(step[1], reference_logits(tiny_model, [*long, 6]), atol=ATOL, rtol=0)


def test_decoding_and_prefilling_in_one_pass_equals_each_alone(runner, tiny_model, texts):
    batch = RowsDriver(runner)
    first = batch.add([texts[0], texts[1]], [1, 1])
    seqs = [[*texts[0], int(first[0].argmax())], [*texts[1], int(first[1].argmax())]]
    calls = []
    original = runner.forward

    def counting(step):
        calls.append((step.decode is not None, step.prefill is not None))
        return original(step)

    runner.forward = counting
    decoded, added = batch.step_and_add([s[-1] for s in seqs], [texts[2], texts[3]], [2, 1])
    assert calls == [(True, True)]  # one pass over the weights
    for row, tokens in enumerate(seqs):
        torch.testing.assert_close(decoded[row], reference_logits(tiny_model, tokens), atol=ATOL, rtol=0)
    for row, tokens in enumerate([texts[2], texts[2], texts[3]]):
        torch.testing.assert_close(added[row], reference_logits(tiny_model, tokens), atol=ATOL, rtol=0)
    assert batch.lengths == [len(seqs[0]), len(seqs[1]), len(texts[2]), len(texts[2]), len(texts[3])]
    step = batch.step([5, 6, 7, 8, 9])
    torch.testing.assert_close(step[0], reference_logits(tiny_model, [*seqs[0], 5]), atol=ATOL, rtol=0)
    torch.testing.assert_close(step[3], reference_logits(tiny_model, [*texts[2], 8]), atol=ATOL, rtol=0)


def test_a_new_cache_holds_no_garbage(tiny_model):
    # attention multiplies masked slots by 0; 0 * NaN from uninitialised memory would poison whole rows
    runner = FalconRunner(tiny_model, batch_rows=4, max_len=64)
    assert not runner.keys.any() and not runner.values.any()


def test_a_padded_decode_step_equals_the_exact_one_and_writes_no_other_row(runner, texts):
    """What a CUDA graph of a bucket replays: more rows than the batch holds and a wider attention window."""
    batch = RowsDriver(runner)
    batch.add(texts[:3], [1, 1, 1])
    batch.set_tokens(0, [5, 6, 7])
    width = max(batch.lengths) + 1
    exact = runner.decode(3, width).clone()
    keys, values = runner.keys.clone(), runner.values.clone()
    padded = runner.decode(6, 128)  # rows 3..5 are padding; positions up to 128 are masked
    torch.testing.assert_close(padded[:3], exact, atol=ATOL, rtol=0)
    # the batch's rows got the same keys and values again (up to rounding: a 6-row matmul); the free
    # rows and the staging row were not written at all: padding writes go to the scratch row
    torch.testing.assert_close(runner.keys[:, :3], keys[:, :3], atol=1e-5, rtol=0)
    untouched = [row for row in range(3, runner.cache.rows) if row != runner.cache.scratch_row]
    assert torch.equal(runner.keys[:, untouched], keys[:, untouched])
    assert torch.equal(runner.values[:, untouched], values[:, untouched])
    assert not torch.equal(runner.keys[:, runner.cache.scratch_row], keys[:, runner.cache.scratch_row])


def test_decode_graph_buckets_cover_every_batch_size_and_width():
    from falcon_service.engine.cuda_graphs import batch_buckets, bucket, width_buckets

    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(3) == [1, 2, 3] and batch_buckets(1) == [1] and batch_buckets(12) == [1, 2, 4, 8, 12]
    assert width_buckets(2048) == [128, 256, 512, 1024, 2048] and width_buckets(100) == [100]
    sizes, widths = batch_buckets(37), width_buckets(2048)
    for rows in range(1, 38):
        chosen = bucket(rows, sizes)
        assert chosen is not None and rows <= chosen <= 37 and chosen - rows < 8
    assert [bucket(w, widths) for w in (1, 128, 129, 1500, 2048)] == [128, 128, 256, 2048, 2048]
    assert bucket(2049, widths) is None


# bf16 tolerance, stated (the GPU check holds Falcon-7B to the same): the engine's logits stay within 2%
# (relative L2) of transformers' bf16 logits, and no further from the float32 logits than 1.5x
# transformers' own bf16 distance to them
BF16_REL_L2 = 2e-2
BF16_RATIO_VS_FLOAT32 = 1.5


def test_bf16_logits_stay_within_the_stated_tolerance_of_transformers(tiny_checkpoint, tiny_model, texts):
    def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    from transformers import AutoModelForCausalLM

    bf16 = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.bfloat16).to(TEST_DEVICE).eval()
    runner = FalconRunner(bf16, batch_rows=4, max_len=128)
    batch = RowsDriver(runner)
    prompts = [texts[1], texts[2]]
    fed = [[11, 12, 13, 14, 15, 16, 17, 18], [21, 22, 23, 24, 25, 26, 27, 28]]
    ours = [batch.add(prompts, [1, 1]).float()]
    for step in range(len(fed[0])):
        ours.append(batch.step([f[step] for f in fed]).float())
    engine = torch.stack(ours, dim=1)  # (2, 9, vocab)
    theirs, exact = [], []
    for prompt, tokens in zip(prompts, fed, strict=True):
        ids = torch.tensor([[*prompt, *tokens]], device=TEST_DEVICE)
        start = len(prompt) - 1
        with torch.inference_mode():
            theirs.append(bf16(ids).logits[0, start:].float())
            exact.append(tiny_model(ids).logits[0, start:].float())
    theirs_t, exact_t = torch.stack(theirs), torch.stack(exact)
    assert rel_l2(engine, theirs_t) <= BF16_REL_L2
    assert rel_l2(engine, exact_t) <= BF16_RATIO_VS_FLOAT32 * rel_l2(theirs_t, exact_t)


def test_bf16_decode_attention_keeps_scores_and_softmax_in_float32():
    """Against float64 attention over the same bf16 inputs, the error is that of rounding the output to
    bf16; scores and softmax computed in bf16 make it about five times larger."""
    from falcon_service.engine.falcon import decode_attention

    generator = torch.Generator().manual_seed(0)
    batch, heads, width, dim = 4, 8, 512, 64
    q, k, v = (torch.randn(shape, generator=generator) * scale for shape, scale in
               (((batch, heads, dim), 2.0), ((batch, width, dim), 2.0), ((batch, width, dim), 1.0)))
    q, k, v = (t.to(TEST_DEVICE, torch.bfloat16) for t in (q, k, v))
    lengths = torch.tensor([511, 300, 17, 450], device=TEST_DEVICE)
    mask = torch.zeros(batch, 1, 1, width, dtype=torch.bfloat16, device=TEST_DEVICE)
    mask.masked_fill_(torch.arange(width, device=TEST_DEVICE) > lengths[:, None, None, None], float("-inf"))
    scores = (q.double() @ k.double().transpose(1, 2)) * 0.125 + mask[:, 0].double()
    exact = scores.softmax(-1) @ v.double()

    def error(out: torch.Tensor) -> float:
        return float((out.double() - exact).norm() / exact.norm())

    got = decode_attention(q, k, v, mask, 0.125)
    assert error(got) <= 1.5 * error(exact.to(torch.bfloat16))


def test_a_step_replayed_in_pieces_of_its_token_bucket_equals_the_eager_one(tiny_model, texts):
    """What a captured mixed step runs: the pieces between attention calls over fixed buffers padded to the
    token bucket. The logits are the eager forward's; the padding tokens write their keys and values to
    position 0 of the scratch row, nowhere else."""
    from falcon_service.engine.cuda_graphs import StepGraphs, bucket
    from falcon_service.engine.falcon import Segment, StepBatch

    def make() -> tuple[FalconRunner, RowsDriver]:
        runner = FalconRunner(tiny_model, batch_rows=6, max_len=128)
        driver = RowsDriver(runner)
        driver.add([texts[0], texts[3]], [1, 1])
        driver.set_tokens(0, [5, 6])
        runner.prefill([4], [texts[1][:4]], [0])  # a row that continues after what it holds
        return runner, driver

    def step(runner: FalconRunner) -> StepBatch:
        segments = [Segment(2, 0, texts[2]), Segment(3, 0, texts[0][:3]), Segment(4, 4, texts[1][4:])]
        return StepBatch(runner, 2, max(len(texts[0]), len(texts[3])) + 1, None, segments)

    eager_runner, _ = make()
    eager = eager_runner.forward(step(eager_runner))
    runner, _ = make()
    before = runner.keys.clone()
    replays: list[int] = []

    def capture(piece):
        def replay() -> None:
            replays.append(1)
            piece()
        return replay

    graphs = StepGraphs(runner, max_tokens=64, capture=capture)
    batch = step(runner)
    assert bucket(batch.tokens, graphs.buckets) > batch.tokens, "the test needs padding tokens"
    replayed = graphs.forward(batch)
    torch.testing.assert_close(replayed, eager, atol=ATOL, rtol=0)
    assert len(replays) == 1 + len(runner.layers)
    scratch = runner.cache.scratch_row
    real = [row for row in range(runner.cache.rows) if row != scratch]
    torch.testing.assert_close(runner.keys[:, real], eager_runner.keys[:, real], atol=1e-5, rtol=0)
    written = (runner.keys != before).any(-1)  # (layers, rows, positions) that changed
    assert not written[:, 5:scratch].any() and not written[:, scratch + 1:].any(), \
        "nothing past the step's rows was written: the padding tokens write to the scratch row"
    assert written[:, scratch, 0].all() and not written[:, scratch, 1:].any()


def test_token_buckets_cover_every_step_with_little_padding():
    from falcon_service.engine.cuda_graphs import bucket, token_buckets

    buckets = token_buckets(768)
    assert buckets[:6] == [1, 2, 4, 8, 16, 24] and buckets[-1] == 768 and len(buckets) < 48
    for tokens in range(1, 769):
        chosen = bucket(tokens, buckets)
        assert chosen is not None and tokens <= chosen and chosen - tokens <= max(7, tokens // 8)
    assert token_buckets(5) == [1, 2, 4, 5]


def test_every_token_bucket_replays_a_mixed_step_as_the_eager_forward_computes_it(tiny_model):
    """Each bucket of the captured pieces, filled exactly and with the most padding it takes (one token past the
    bucket below): two rows decoding and a prompt segment, logits equal to the eager forward's."""
    from falcon_service.engine.cuda_graphs import StepGraphs, token_buckets
    from falcon_service.engine.falcon import Segment, StepBatch

    def replaying(piece):
        return piece

    buckets = token_buckets(72)
    eager_runner = FalconRunner(tiny_model, batch_rows=4, max_len=128)
    runner = FalconRunner(tiny_model, batch_rows=4, max_len=128)
    graphs = StepGraphs(runner, max_tokens=72, capture=replaying)
    for r in (eager_runner, runner):  # two rows that decode
        r.prefill([0, 1], [[5, 6, 7], [8, 9]], [0, 0])
        r.lengths[:2] = torch.tensor([3, 2])
        r.write_rows[:2] = torch.tensor([0, 1])
        r.tokens[:2] = torch.tensor([11, 12])
    sizes = sorted({b for b in buckets if b > 2} | {lower + 1 for lower in buckets if lower + 1 > 2})
    for tokens in sizes:
        prompt = [(7 * i) % 500 + 3 for i in range(tokens - 2)]
        want = eager_runner.forward(StepBatch(eager_runner, 2, 4, None, [Segment(2, 0, prompt)]))
        got = graphs.forward(StepBatch(runner, 2, 4, None, [Segment(2, 0, prompt)]))
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"{tokens} tokens")
    assert graphs.captured == {b for b in buckets if b >= 3}


def test_fused_small_ops_compute_what_the_eager_ops_compute(tiny_model, texts):
    """`fused_ops`: rotary positions, and the residual adds with the next layer norm, compiled into one kernel each
    (C++ here, Triton on a GPU): prefill, decode and mixed steps, eager and replayed in the pieces of their token
    bucket, give the eager ops' logits and cache."""
    import torch._dynamo.utils

    from falcon_service.engine.cuda_graphs import StepGraphs
    from falcon_service.engine.falcon import Segment, StepBatch

    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager, fused = (FalconRunner(tiny_model, batch_rows=6, max_len=128, fused_ops=f) for f in (False, True))
    pieces = StepGraphs(fused, max_tokens=64, capture=lambda piece: piece)
    for run in (lambda r: r.forward, lambda r: r.forward if r is eager else pieces.forward):
        steps = [
            lambda r: StepBatch(r, segments=[Segment(0, 0, texts[0]), Segment(1, 0, texts[3])]),
            lambda r: StepBatch(r, segments=[Segment(2, 0, texts[1][:5])]),
            lambda r: StepBatch(r, 2, 16, None, [Segment(2, 5, texts[1][5:]), Segment(3, 0, texts[2])]),
            lambda r: StepBatch(r, 4, 32),
        ]
        for r in (eager, fused):
            r.cache.keys.zero_()
            r.cache.values.zero_()
        for i, make in enumerate(steps):
            for r in (eager, fused):
                r.lengths[:4] = torch.tensor([len(texts[0]), len(texts[3]), len(texts[1]), len(texts[2])])
                r.write_rows[:4] = torch.arange(4)
                r.tokens[:4] = torch.tensor([11, 12, 13, 14])
            want, got = eager.forward(make(eager)), run(fused)(make(fused))
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"step {i}")
        real = [row for row in range(fused.cache.rows) if row != fused.cache.scratch_row]  # padding writes there
        torch.testing.assert_close(fused.keys[:, real], eager.keys[:, real], atol=1e-5, rtol=0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > compiled_before, "nothing was compiled"
    assert pieces.captured
