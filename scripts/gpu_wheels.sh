#!/usr/bin/env bash
# Download, into .whl/ (git-ignored), the Python 3.12 wheels that scripts/gpu_check.sh needs on a GPU
# machine that has torch, transformers and accelerate but no network: BentoML and FastAPI with the
# dependencies that such a machine lacks (about 7 MB), uvloop and httptools (the event loop and HTTP
# parser the service runs with in production), llguidance (the grammar engine), pytest-asyncio and
# jsonschema for the engine's tests, and nvidia-ml-py (the GPU's busy share under load): 16 MB in all.
# Run it here (where PyPI is reachable), then carry .whl with the call.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_26_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 \
         manylinux_2_35_x86_64 manylinux1_x86_64 manylinux_2_5_x86_64 manylinux2010_x86_64 any; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  bentoml==1.4.40 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  typing-inspection==0.4.5 annotated-types==0.8.0 uvicorn==0.54.0 pytest-asyncio==1.5.0 \
  a2wsgi==1.10.10 aiohttp-asgi-connector==1.2.0 aiosqlite==0.22.1 asgiref==3.13.0 cattrs==23.1.2 \
  click-option-group==0.5.10 httpx-ws==0.9.0 kantoku==0.18.3 opentelemetry-api==1.45.1 \
  opentelemetry-instrumentation==0.66b1 opentelemetry-instrumentation-aiohttp-client==0.66b1 \
  opentelemetry-instrumentation-asgi==0.66b1 opentelemetry-sdk==1.45.1 \
  opentelemetry-semantic-conventions==0.66b1 opentelemetry-util-http==0.66b1 \
  pip-requirements-parser==32.0.1 python-json-logger==4.2.0 python-multipart==0.0.34 pyzmq==27.3.0 \
  rich-toolkit==0.20.6 schema==0.7.8 simple-di==0.1.5 tomli-w==1.2.0 tornado==6.6.1 \
  watchfiles==1.3.0 wsproto==1.3.2 llguidance==1.6.1 uvloop==0.23.0 httptools==0.9.0 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 \
  nvidia-ml-py==13.615.71
du -sh .whl
