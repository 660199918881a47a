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
