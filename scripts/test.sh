#!/usr/bin/env bash
# Set up .venv and the packaging checks' tools (scripts/setup.sh; quick and offline once done), then run the
# linter and the tests, offline, CPU only:
#   scripts/test.sh          every tier: unit, e2e (a real `bentoml serve`), packaging (`bentoml build`, the
#                            manifests, the image's checks); CI runs this
#   scripts/test.sh --fast   the unit tier only (in process: engine, API, server, service; under 2 minutes on 2 cores)
# Further arguments go to pytest (e.g. scripts/test.sh --fast -x tests/api).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=()
if [ "${1:-}" = "--fast" ]; then
  tier=(-m unit)
  shift
fi
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "${tier[@]}" "$@"
