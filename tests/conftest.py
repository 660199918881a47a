"""Shared fixtures: a tiny random-weight Falcon checkpoint built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from falcon_service.checkpoints import build_random_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A "tiny" random Falcon checkpoint (weights, config, byte-level BPE tokenizer) on disk."""
    return build_random_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"), "tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint: Path):
    """The tiny checkpoint's tokenizer; shared by the session, so tests must not modify it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    """The tiny checkpoint as a float32 `FalconForCausalLM` in eval mode; shared, so tests must not modify it."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


class ControlledModel:
    """The tiny model with a handle on its engine's forward passes: a test can make them fail, pause
    them, and see the shapes they ran.

    Engines built with `runner_factory=controlled.runner_factory` run through it. `fail = True` makes
    every forward raise; clearing `running` blocks the next forward until it is set again; `calls`
    records `(rows, new tokens per row, attention width)` of every prefill and decode.
    """

    def __init__(self, inner) -> None:
        import threading

        self.inner = inner
        self.fail = False
        self.running = threading.Event()
        self.running.set()
        self.calls: list[tuple[int, int, int]] = []

    def _gate(self, shape: tuple[int, int, int]) -> None:
        if not self.running.wait(timeout=30):
            raise RuntimeError("ControlledModel stayed paused for 30 s")
        if self.fail:
            raise RuntimeError("injected forward failure")
        self.calls.append(shape)

    def runner_factory(self, model, rows: int, max_len: int):
        from falcon_service.engine.falcon import FalconRunner

        controlled = self

        class ControlledRunner(FalconRunner):
            def forward(self, decode, prefill):  # every pass: decode rows, prompt chunks, or both at once
                if decode is not None:
                    controlled._gate((decode.count, 1, decode.width))
                if prefill is not None:
                    controlled._gate((prefill.n, prefill.width_q, prefill.width_k))
                return super().forward(decode, prefill)

        return ControlledRunner(model, rows, max_len)


@pytest.fixture
def controlled_model(tiny_model):
    """A fresh `ControlledModel` around the shared tiny model; left running after the test."""
    model = ControlledModel(tiny_model)
    yield model
    model.fail = False
    model.running.set()
