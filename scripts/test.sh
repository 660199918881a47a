#!/usr/bin/env bash
# Set up .venv and run the linter and the whole test suite (unit, API, e2e, bento build); offline, CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh requirements-dev.txt
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
