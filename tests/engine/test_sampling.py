"""Logits processing and sampling on hand-made logits (on the test device): penalties, bias, filters,
generators, logprobs."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from falcon_service.engine.device import DeviceIO
from falcon_service.engine.sampling import SamplingParams, SamplingState, TokenLogprob, apply_penalties, sample

TEST_DEVICE = os.environ.get("FALCON_TEST_DEVICE", "cpu")  # see tests/conftest.py

VOCAB = 8
IO = DeviceIO(TEST_DEVICE)
# close values, so an unfiltered sample at temperature 1 is far from always the argmax
FLAT = torch.tensor([1.0, 0.9, 1.2, 0.8, 1.1, 0.95, 0.85, 1.05], device=TEST_DEVICE)


def state(params: SamplingParams, prompt: tuple[int, ...] = (0,), seed: int | None = None) -> SamplingState:
    return SamplingState(params, prompt, VOCAB, seed, io=IO)


def pick(logits: torch.Tensor, states: list[SamplingState]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample on the device, then read the tokens and logprobs back."""
    return sample(logits, states, IO).download(IO).result()


def draw(params: SamplingParams, logits: torch.Tensor, seed: int, times: int = 1) -> list[int]:
    """`times` samples of one row with its own seeded generator."""
    s = state(params, seed=seed)
    return [pick(logits.unsqueeze(0), [s])[0][0] for _ in range(times)]


# ---------- penalties ----------


def test_presence_and_frequency_penalties_follow_openai_on_generated_tokens_only():
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    s = state(params, prompt=(1, 6))
    for token in (2, 2, 2, 3):
        s.record(token)
    logits = torch.tensor([0.5, 1.0, -2.0, 3.0, 0.0, -1.0, 2.0, 4.0], device=TEST_DEVICE)
    counts = torch.tensor([0.0, 0.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0], device=TEST_DEVICE)
    expected = logits - 0.25 * counts - 0.5 * (counts > 0).float()

    got = apply_penalties(logits.clone(), s)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got[1] == logits[1] and got[6] == logits[6]  # prompt tokens are not penalised


def test_frequency_penalty_accumulates_over_sampled_tokens():
    s = state(SamplingParams(temperature=0.0, frequency_penalty=1.0), prompt=(0,))
    logits = torch.tensor([[3.0, 2.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], device=TEST_DEVICE)
    # token 0 is in the prompt yet still first; once generated, 3 - 1 < 2.5; then 2.5 - 1 < 3 - 1
    picks = [pick(logits, [s])[0][0] for _ in range(3)]
    assert picks == [0, 1, 0]


def test_repetition_penalty_matches_transformers_on_prompt_and_output():
    penalty = 1.3
    s = state(SamplingParams(repetition_penalty=penalty), prompt=(1, 2))
    s.record(5)
    s.record(6)
    logits = torch.tensor([0.5, 2.0, -2.0, 3.0, 0.0, -1.0, 1.5, 4.0], device=TEST_DEVICE)
    expected = logits.clone()
    for token in (1, 2, 5, 6):
        value = logits[token]
        expected[token] = value / penalty if value > 0 else value * penalty
    got = apply_penalties(logits.clone(), s)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)

    hf = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([[1, 2, 5, 6]], device=TEST_DEVICE),
                                                   logits.clone().unsqueeze(0))
    torch.testing.assert_close(got, hf[0], rtol=0, atol=1e-6)


def test_logit_bias_adds_to_the_logits():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]], device=TEST_DEVICE)
    states = [
        state(SamplingParams(temperature=0.0, logit_bias={3: 6.0})),  # 6 > 5: token 3 wins
        state(SamplingParams(temperature=0.0, logit_bias={3: 4.0})),  # 4 < 5: token 0 stays
        state(SamplingParams(temperature=0.0, logit_bias={0: -5.5, 7: -0.25})),  # -0.5 < 0 < -0.25: token 1
    ]
    tokens, _ = pick(logits.repeat(3, 1), states)
    assert tokens == [3, 0, 1]


# ---------- temperature, top-k, top-p ----------


def test_temperature_zero_is_argmax_per_row():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(3)).to(TEST_DEVICE)
    states = [state(SamplingParams(temperature=0.0)) for _ in range(4)]
    tokens, _ = pick(logits, states)
    assert tokens == logits.argmax(-1).tolist()


def test_top_k_one_is_always_the_argmax_even_at_temperature_one():
    filtered = SamplingParams(temperature=1.0, top_k=1)
    assert {t for seed in range(40) for t in draw(filtered, FLAT, seed)} == {2}
    # without the filter the same seeds spread over the vocabulary
    assert len({t for seed in range(40) for t in draw(SamplingParams(temperature=1.0), FLAT, seed)}) > 3


def test_tiny_top_p_keeps_only_the_top_token():
    filtered = SamplingParams(temperature=1.0, top_p=1e-6)
    assert {t for seed in range(40) for t in draw(filtered, FLAT, seed)} == {2}
    assert len({t for seed in range(40) for t in draw(SamplingParams(temperature=1.0, top_p=0.99), FLAT, seed)}) > 3


def test_top_p_drops_the_tail_of_the_distribution():
    # three tokens hold ~99.9 %
    logits = torch.tensor([4.0, 3.9, 3.8, -5.0, -5.0, -5.0, -5.0, -5.0], device=TEST_DEVICE)
    picked = {t for seed in range(60) for t in draw(SamplingParams(temperature=1.0, top_p=0.9), logits, seed)}
    assert picked == {0, 1, 2}


# ---------- per-request generators ----------


def test_same_seed_samples_the_same_whatever_the_other_rows():
    params = SamplingParams(temperature=1.0, top_p=0.95)
    alone_state = state(params, seed=42)
    alone = [pick(FLAT.unsqueeze(0), [alone_state])[0][0] for _ in range(30)]

    crowd = [
        state(SamplingParams(temperature=0.7)),  # unseeded: its own generator, seeded by the OS
        state(params, seed=42),
        state(SamplingParams(temperature=1.0, top_k=3), seed=42),
        state(SamplingParams(temperature=0.0)),
        state(SamplingParams(temperature=1.5, presence_penalty=1.0), seed=7),
    ]
    logits = torch.stack([FLAT.flip(0), FLAT, FLAT * 2, FLAT, FLAT.roll(3)])
    in_crowd = [pick(logits, crowd)[0][1] for _ in range(30)]
    assert in_crowd == alone

    assert len(set(alone)) > 2, "the seeded row should actually be sampling"
    other_seed = state(params, seed=43)
    assert [pick(FLAT.unsqueeze(0), [other_seed])[0][0] for _ in range(30)] != alone


# ---------- logprobs ----------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.5, top_k=4, logprobs=5),
        SamplingParams(temperature=1.0, presence_penalty=2.0, logit_bias={4: 50.0}, logprobs=2),
    ],
    ids=["greedy", "sampled", "penalised"],
)
def test_logprobs_come_from_the_raw_logits_and_are_sorted(params: SamplingParams):
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(5)).to(TEST_DEVICE)
    states = [state(params, seed=1), state(SamplingParams(temperature=0.0))]
    tokens, logprobs = pick(logits, states)
    raw = logits.log_softmax(-1)

    lp = logprobs[0]
    assert lp is not None and lp.token_id == tokens[0]
    assert lp.logprob == pytest.approx(float(raw[0, tokens[0]]), abs=1e-5)
    assert len(lp.top) == params.logprobs
    values = [v for _, v in lp.top]
    assert values == sorted(values, reverse=True)
    want = raw[0].topk(params.logprobs)
    assert [i for i, _ in lp.top] == want.indices.tolist()
    assert values == pytest.approx(want.values.tolist(), abs=1e-5)
    assert logprobs[1] is None  # a row that did not ask gets none


def test_logprobs_zero_gives_the_chosen_token_only():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(6)).to(TEST_DEVICE)
    tokens, logprobs = pick(logits, [state(SamplingParams(temperature=0.0, logprobs=0))])
    lp = logprobs[0]
    assert lp is not None and lp.top == []
    assert lp.logprob == pytest.approx(float(logits.log_softmax(-1)[0, tokens[0]]), abs=1e-5)
