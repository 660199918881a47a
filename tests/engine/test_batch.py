"""RunningBatch: left padding, concatenation and row selection never change what a sequence computes."""

from __future__ import annotations

import pytest
import torch

from falcon_service.engine.batch import RunningBatch

ATOL = 1e-4


def check_shape(batch: RunningBatch) -> None:
    """Mask, positions and every cache layer agree on rows and width; cache_tokens is rows * width."""
    assert batch.cache_tokens == batch.size * batch.width
    assert batch.next_positions.shape == (batch.size,)
    for layer in batch.cache.layers:
        assert layer.keys.shape[0] == batch.size and layer.keys.shape[2] == batch.width
        assert layer.values.shape[0] == batch.size and layer.values.shape[2] == batch.width


class Alone:
    """One sequence run on its own, as the reference for the batched rows."""

    def __init__(self, model, prompt: list[int]) -> None:
        self.model = model
        self.batch, logits = RunningBatch.prefill(model, [prompt], [1])
        self.logits = logits[0]

    def step(self, token: int) -> torch.Tensor:
        self.logits = self.batch.step(self.model, [token])[0]
        return self.logits


def assert_rows_match(logits: torch.Tensor, alone: list[Alone]) -> None:
    assert logits.shape[0] == len(alone)
    for row, ref in enumerate(alone):
        torch.testing.assert_close(logits[row], ref.logits, atol=ATOL, rtol=0, msg=f"row {row} differs")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(1, 1000, (n,), generator=gen).tolist() for n in (3, 7, 12, 5)]


def test_prefill_pads_left_and_matches_each_prompt_alone(tiny_model, prompts):
    batch, logits = RunningBatch.prefill(tiny_model, prompts[:3], [1, 1, 1])
    assert batch.size == 3 and batch.width == 12
    check_shape(batch)
    assert batch.attention_mask.sum(-1).tolist() == [3, 7, 12]
    assert batch.attention_mask[0].tolist() == [0] * 9 + [1] * 3
    assert batch.next_positions.tolist() == [3, 7, 12]
    assert_rows_match(logits, [Alone(tiny_model, p) for p in prompts[:3]])


def test_prefill_repeats_rows_for_n_choices(tiny_model, prompts):
    batch, logits = RunningBatch.prefill(tiny_model, prompts[:2], [2, 3])
    assert batch.size == 5
    check_shape(batch)
    refs = [Alone(tiny_model, prompts[0])] * 2 + [Alone(tiny_model, prompts[1])] * 3
    assert_rows_match(logits, refs)
    assert batch.next_positions.tolist() == [3, 3, 7, 7, 7]


def test_concatenate_then_select_matches_running_alone(tiny_model, prompts):
    feeds = torch.randint(1, 1000, (4, 8), generator=torch.Generator().manual_seed(12)).tolist()

    # batch a: prompts of 3 and 7 tokens, two decode steps in -> width 9
    a, logits_a = RunningBatch.prefill(tiny_model, prompts[:2], [1, 1])
    alone = [Alone(tiny_model, p) for p in prompts[:2]]
    for step in range(2):
        logits_a = a.step(tiny_model, [feeds[0][step], feeds[1][step]])
        for i in range(2):
            alone[i].step(feeds[i][step])
    assert_rows_match(logits_a, alone)
    assert a.width == 9

    # batch b is wider (12), batch c narrower (5): pad the running batch, then the new one
    b, _ = RunningBatch.prefill(tiny_model, [prompts[2]], [1])
    joined = a.concatenate(b)
    assert joined.size == 3 and joined.width == 12
    check_shape(joined)
    c, _ = RunningBatch.prefill(tiny_model, [prompts[3]], [1])
    joined = joined.concatenate(c)
    assert joined.size == 4 and joined.width == 12
    check_shape(joined)
    alone += [Alone(tiny_model, prompts[2]), Alone(tiny_model, prompts[3])]

    pos = [2, 2, 0, 0]  # how many feed tokens each row has taken
    for _ in range(3):
        tokens = [feeds[row][pos[row]] for row in range(4)]
        logits = joined.step(tiny_model, tokens)
        for row in range(4):
            alone[row].step(tokens[row])
            pos[row] += 1
        assert_rows_match(logits, alone)
    assert joined.width == 15
    check_shape(joined)

    # drop the widest row (prompt of 12): rows left hold 3+5, 7+5, 5+3 real tokens -> width 12
    kept = [3, 0, 1]
    selected = joined.select(kept)
    assert selected.size == 3 and selected.width == 12
    check_shape(selected)
    alone = [alone[i] for i in kept]
    pos = [pos[i] for i in kept]
    for _ in range(2):
        tokens = [feeds[row_src][pos[row]] for row, row_src in enumerate(kept)]
        logits = selected.step(tiny_model, tokens)
        for row in range(3):
            alone[row].step(tokens[row])
            pos[row] += 1
        assert_rows_match(logits, alone)

    # keeping one sequence shrinks the batch to exactly its own length (prompt 5, 3 + 2 tokens fed)
    single = selected.select([0])
    assert single.width == int(single.attention_mask.sum()) == 5 + 3 + 2
    assert single.attention_mask.all()
    check_shape(single)


def test_concatenate_wider_running_batch_with_narrower_new_one(tiny_model, prompts):
    a, _ = RunningBatch.prefill(tiny_model, [prompts[2]], [1])
    b, _ = RunningBatch.prefill(tiny_model, [prompts[0], prompts[1]], [1, 1])
    joined = a.concatenate(b)
    assert joined.width == 12 and joined.cache_tokens == 36
    assert joined.attention_mask.sum(-1).tolist() == [12, 3, 7]
    logits = joined.step(tiny_model, [5, 6, 7])
    alone = [Alone(tiny_model, prompts[i]) for i in (2, 0, 1)]
    for ref, token in zip(alone, [5, 6, 7], strict=True):
        ref.step(token)
    assert_rows_match(logits, alone)


def test_select_can_repeat_rows(tiny_model, prompts):
    batch, _ = RunningBatch.prefill(tiny_model, prompts[:2], [1, 1])
    twice = batch.select([1, 1])
    assert twice.size == 2 and twice.width == 7  # the 3-token row and its padding are gone
    check_shape(twice)
    logits = twice.step(tiny_model, [9, 10])
    refs = [Alone(tiny_model, prompts[1]), Alone(tiny_model, prompts[1])]
    refs[0].step(9)
    refs[1].step(10)
    assert_rows_match(logits, refs)
