"""Every tensor a step makes lives on the model's device, and a step never makes the host wait for it.

On a CPU-only machine the model runs on the `meta` device for this: meta tensors have shapes but
no values, so an op that mixes in a CPU tensor fails as it would on CUDA ("tensor on device cpu is
not on the expected device"), and an op that needs a value on the host (`.item()`, `int(t)`,
boolean indexing, `nonzero`) fails because there is none. A dispatch mode also records every op
that takes a CPU tensor beside meta ones (CUDA would accept a CPU index and copy it with a sync).
With FALCON_TEST_DEVICE=cuda the same steps run on the GPU under `torch.cuda.set_sync_debug_mode`.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from rows_driver import RowsDriver
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import FalconForCausalLM

from falcon_service.checkpoints import PRESETS, falcon_config
from falcon_service.engine.falcon import FalconRunner
from falcon_service.engine.sampling import SamplingParams, SamplingState, sample

TEST_DEVICE = os.environ.get("FALCON_TEST_DEVICE", "cpu")  # see tests/conftest.py
DEVICE = "cuda" if TEST_DEVICE.startswith("cuda") else "meta"
TRANSFERS = {"aten._to_copy.default", "aten.copy_.default"}  # explicit uploads and downloads


class MixedDevices(TorchDispatchMode):
    """Records ops that take a CPU tensor (not a 0-dim scalar) together with device tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)]
        devices = {t.device.type for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if "cpu" in devices and len(devices) > 1 and str(func) not in TRANSFERS:
            self.mixed.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """On CUDA, any synchronising call raises; on meta, a value read fails by itself."""
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:
        yield


@pytest.fixture(scope="module")
def model():
    config = falcon_config(PRESETS["tiny"], eos_token_id=0)
    with torch.device(DEVICE):
        model = FalconForCausalLM(config).eval()
    return model


PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=3),
    SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.2, repetition_penalty=1.2,
                   logit_bias={3: 2.0, 7: -1.0}, logprobs=2),
]


def states(model, count: int) -> list[SamplingState]:
    return [SamplingState(PARAMS[i % len(PARAMS)], (1, 2, 3), model.config.vocab_size, seed=i, device=DEVICE)
            for i in range(count)]


def test_prefill_decode_and_sampling_stay_on_the_device_without_host_reads(model):
    runner = FalconRunner(model, batch_rows=6, max_len=128)
    batch = RowsDriver(runner)
    audit = MixedDevices()
    with audit, no_host_sync():
        # two prompts, one with two choices; then a decode step; then a new prompt joins a decode step
        logits = batch.add([[5, 6, 7], [8, 9]], [1, 2])
        sampled = sample(logits, states(model, 3))
        batch.set_tokens(0, sampled.tokens)
        sampled = sample(batch.step(), states(model, 3))
        batch.set_tokens(0, sampled.tokens)
        decoded, added = batch.step_and_add(None, [[10, 11, 12, 13]], [1])
        sampled = sample(torch.cat([decoded, added]), states(model, 4))
        batch.set_tokens(0, sampled.tokens)
        # a long prompt staged in two chunks (the second attends to the cached first), then it joins
        batch.stage(list(range(20, 30)), 0)
        staged = batch.stage(list(range(30, 35)), 10, prompt=list(range(20, 35)))
        batch.set_tokens(4, sample(staged, states(model, 1)).tokens)
        batch.remove([1])
        logits = batch.step()
        final = sample(logits, states(model, 4))
    assert audit.mixed == []
    assert final.tokens.device.type == DEVICE and logits.device.type == DEVICE
    assert final.chosen_logprobs is not None and final.chosen_logprobs.device.type == DEVICE
    assert batch.lengths == [6, 16, 5, 5]  # row 1 left; the last row (the staged prompt) took its place


def test_sampling_state_tensors_live_on_the_device(model):
    state = SamplingState(PARAMS[2], (1, 2, 3), model.config.vocab_size, seed=1, device=DEVICE)
    assert state.output_counts is not None and state.output_counts.device.type == DEVICE
    assert state.prompt_mask is not None and state.prompt_mask.device.type == DEVICE
    assert state.bias is not None and {t.device.type for t in state.bias} == {DEVICE}
