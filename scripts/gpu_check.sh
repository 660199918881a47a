#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): engine tests on CUDA, the 7b preset built on the GPU, copy
# bandwidth and roofline, logits against transformers (batch 1, 64, a mixed step; float32 distance), the
# mixed step against the pure decode step, transformers' compiled generate, and the service at 1, 16, 64
# and 256 streams with the GPU's busy share. Writes gpu_check.md, gpu_check.json and logs to $OUT (or
# ./gpu_check_out).
# On a machine without network, first run scripts/gpu_wheels.sh where PyPI is reachable and bring .whl/.
# Arguments go to benchmarks/gpu_check.py (e.g. --preset tiny --device cpu for a dry run on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/falcon-site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/falcon-site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
