#!/usr/bin/env bash
# Download the wheels `hwattn serve` needs that the GPU machines lack (FastAPI, uvicorn,
# pydantic and what they import), for Python 3.12 on manylinux x86-64, into the git-ignored
# .whl/ folder at the repository root. Versions are the ones the tests run with.
#
#   bash benchmarks/fetch_serving_wheels.sh            # here, with network access
#
# There, carry `.whl` and start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d .whl \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  typing-inspection==0.4.5 annotated-types==0.8.0 annotated-doc==0.0.7 \
  typing-extensions==4.16.0 opentelemetry-api==1.45.2 anyio==4.16.0
ls -1 .whl
du -sh .whl
