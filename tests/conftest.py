"""Shared fixtures: a tiny random-weight Falcon checkpoint built once per test session.

`FALCON_TEST_DEVICE` (default `cpu`) puts the model, and so the engine's tensors, on another
device: `FALCON_TEST_DEVICE=cuda pytest tests/engine` runs the engine's tests on a GPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from falcon_service.checkpoints import build_random_checkpoint

TEST_DEVICE = os.environ.get("FALCON_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    # Triton has no CPU backend: its kernels (engine/varlen_attention.py) run under its interpreter here. Set
    # before anything imports Triton (torch's compiler does), or the interpreter meets kernels built for a GPU.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> str:
    """Where the engine's tests run (`FALCON_TEST_DEVICE`, default cpu)."""
    return TEST_DEVICE


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
    """The tiny checkpoint as a float32 `FalconForCausalLM` in eval mode on the test device; shared, so
    tests must not modify it. (float32 on CUDA too, without TF32: the engine must match transformers
    closely; bf16 has tests of its own with stated tolerances.)"""
    import torch
    from transformers import AutoModelForCausalLM

    if TEST_DEVICE.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).to(TEST_DEVICE).eval()


class ControlledModel:
    """The tiny model with a handle on its engine's forward passes: a test can make them fail, pause
    them, and see the shapes they ran.

    Engines built with `runner_factory=controlled.runner_factory` (and `cuda_graphs=False`: a replayed
    CUDA graph does not call the forward) run through it. `fail = True` makes
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

    def runner_factory(self, model, rows: int, max_len: int, **options):
        from falcon_service.engine.falcon import FalconRunner

        controlled = self

        class ControlledRunner(FalconRunner):
            def forward(self, batch):  # every pass: decode rows, prompt chunks, or both at once
                if batch.decode is not None:
                    controlled._gate((batch.decode.count, 1, batch.decode.width))
                if batch.prefill is not None:
                    controlled._gate((batch.prefill.n, batch.prefill.width_q, batch.prefill.width_k))
                return super().forward(batch)

        return ControlledRunner(model, rows, max_len, **options)


@pytest.fixture
def controlled_model(tiny_model):
    """A fresh `ControlledModel` around the shared tiny model; left running after the test."""
    model = ControlledModel(tiny_model)
    yield model
    model.fail = False
    model.running.set()


TESTS = Path(__file__).resolve().parent
TIERS = ("e2e", "packaging")  # folders of tests/ whose tests are a tier of their own; the rest are unit tests


def tier(path: Path) -> str:
    """A test's tier, from its folder: e2e (a real `bentoml serve`), packaging (`bentoml build`, the manifests,
    the image), or unit (in process: `scripts/test.sh --fast`)."""
    folder = path.resolve().relative_to(TESTS).parts[0]
    return folder if folder in TIERS else "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(tier(item.path))
