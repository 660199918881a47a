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
    """Wraps the tiny model so a test can make its forward fail, pause it, and see the shapes it ran.

    `fail = True` makes every forward raise; clearing `running` blocks the next forward until it is set
    again; `calls` records `(rows, new tokens, attention-mask width)` of every forward.
    """

    def __init__(self, inner) -> None:
        import threading

        self.inner = inner
        self.config = inner.config
        self.fail = False
        self.running = threading.Event()
        self.running.set()
        self.calls: list[tuple[int, int, int]] = []

    @property
    def device(self):
        return self.inner.device

    @property
    def dtype(self):
        return self.inner.dtype

    def eval(self) -> ControlledModel:
        return self

    def __call__(self, **kwargs):
        if not self.running.wait(timeout=30):
            raise RuntimeError("ControlledModel stayed paused for 30 s")
        if self.fail:
            raise RuntimeError("injected forward failure")
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        self.calls.append((ids.shape[0], ids.shape[1], mask.shape[1]))
        return self.inner(**kwargs)


@pytest.fixture
def controlled_model(tiny_model):
    """A fresh `ControlledModel` around the shared tiny model; left running after the test."""
    model = ControlledModel(tiny_model)
    yield model
    model.fail = False
    model.running.set()
