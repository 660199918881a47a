"""Where the packaging checks' tools are (checkov, kubernetes-validate, kubectl with kustomize, hadolint): a venv
of their own, `.venv/checks`, that scripts/setup.sh makes from the pinned requirements-checks.txt (checkov alone
would bring about 100 packages into the project's venv). The checks only use it, offline; when it is missing,
or older than that file, they fail saying to run the set-up.

    .venv/bin/python tests/packaging/check_tools.py kubectl kustomize deploy/kubernetes/overlays/cpu-smoke
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements-checks.txt"
VENV = REPO / ".venv" / "checks"


class ToolsNotSetUp(RuntimeError):
    """The check tools' venv is missing, or was made from other requirements than today's."""


def tools_bin(venv: Path = VENV) -> Path:
    """The venv's bin folder, once its stamp says it was made from today's requirements-checks.txt."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = venv / "requirements.sha256"
    if not (stamp.is_file() and stamp.read_text().strip() == digest):
        raise ToolsNotSetUp(f"the packaging checks' tools ({venv}) are missing or older than "
                            f"{REQUIREMENTS.name}: run scripts/setup.sh (it installs them, pinned)")
    return venv / "bin"


def tool(name: str) -> str:
    """The path of one tool in the venv."""
    return str(tools_bin() / name)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    os.execv(tool(sys.argv[1]), [sys.argv[1], *sys.argv[2:]])
