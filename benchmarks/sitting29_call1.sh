#!/usr/bin/env bash
# First device call of 2026-12-07's twenty-ninth sitting: the engine's GPU tests at the tree
# the last sitting left untested on a GPU (pinned non-blocking plan uploads, the mixed_steps
# switch, the metadata module split, prompt offsets by a device subtraction), then issue 22's
# split-KV plan knobs at few sequences (engine_check.sh smallplans).
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD OUT=${OUT:-/tmp/s29c1}
mkdir -p "$OUT"
git rev-parse HEAD 2>/dev/null || true
LIMIT=250 bash benchmarks/sitting28_call8.sh
bash benchmarks/engine_check.sh smallplans
