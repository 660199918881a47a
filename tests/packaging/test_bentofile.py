"""bentofile.yaml as BentoML reads it: nothing in it that BentoML ignores (and warns about at every build)."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_bentoml_reads_the_bentofile_without_a_warning(caplog):
    from bentoml._internal.bento.build_config import BentoBuildConfig

    with caplog.at_level(logging.WARNING), (REPO / "bentofile.yaml").open() as f:
        config = BentoBuildConfig.from_yaml(f)
    assert config.docker.base_image == "python:3.11-slim-bookworm"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # the base image's Python is the one the image's lock was resolved for
    assert "--python-version 3.11 " in (REPO / "requirements-image.txt").read_text().splitlines()[1]
    assert "python_version" not in yaml.safe_load((REPO / "bentofile.yaml").read_text())["docker"]
