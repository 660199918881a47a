#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned requirements into it.
# Usage: scripts/setup.sh [requirements file]   (default: requirements-dev.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
reqs="${1:-requirements-dev.txt}"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r "$reqs"
