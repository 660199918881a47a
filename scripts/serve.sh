#!/usr/bin/env bash
# Set up .venv, put a Falcon checkpoint into the BentoML model store and serve it on port 3000.
#   scripts/serve.sh           Falcon-7B-Instruct from the Hugging Face hub (needs hub access; a GPU to be fast)
#   scripts/serve.sh --tiny    a tiny RANDOM-WEIGHT Falcon built locally: offline, CPU, for trying the plumbing
# Extra arguments after the first go to `bentoml serve` (e.g. --port 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
[ "$mode" = "--tiny" ] && shift
scripts/setup.sh requirements.txt
if [ "$mode" = "--tiny" ]; then
  tag=$(.venv/bin/python import_model.py --tiny | tail -n 1)
else
  tag=$(.venv/bin/python import_model.py | tail -n 1)
fi
echo "serving $tag"
FALCON_MODEL="$tag" exec .venv/bin/bentoml serve service:FalconService "$@"
