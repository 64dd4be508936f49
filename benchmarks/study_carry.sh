#!/usr/bin/env bash
# The quality study's corpus, ready to carry to a GPU machine that has no network, in two folders
# of less than 64 MiB each (a transfer limited to 64 MiB at a time takes one): .carry/pack_a and .carry/pack_b.
#
#   bash benchmarks/study_carry.sh            # here, with network: build (or reuse) and pack
#
# Builds data/study from the registries as docs/quality_study.md says (archives cached in
# data/raw; an existing build with the study's build key is reused), packs it, splits the pack
# and prints the build key, which must equal the one the study's runs recorded
# (runs/quality_study/study_runs.jsonl) for a resumed study to accept the data.
# On the GPU machine, first call (carrying .carry/pack_a), then second call (.carry/pack_b):
#   mkdir -p data/pack && cp .carry/pack_a/* data/pack/
#   cp .carry/pack_b/* data/pack/ && python3 -m hwattn data unpack data/pack --out data/study
#
#   bash benchmarks/study_carry.sh head       # here: .carry/study_head, for one device call
#
# `head` writes, instead of the pack, the built corpus with its training shard cut to its first
# 4M tokens (hwattn.data.build.head_build; 35 MiB, carried whole in one call): enough for work
# that needs the study's tokenizer and shapes but not its training set, such as timing training
# steps (benchmarks/study_throughput.py --data data/study_head after
# `mkdir -p data && cp -r .carry/study_head data/`). Its build key is the study's plus
# `-head4000000`, so quality_study.py refuses to add runs made on it to the study's records.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
key() { "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['build_key'])" "$1"; }
want=$("$PY" -c "import json; print(json.loads(open('runs/quality_study/study_runs.jsonl').readline())['build_key'])")
t0=$SECONDS
if [[ -f data/study/manifest.json && $(key data/study/manifest.json) == "$want" ]]; then
  echo "data/study already holds build $want"
else
  "$PY" -m hwattn data build --corpus registry --tokenizer bpe:32768 --out data/study --cache data/raw \
    --val-fraction 0.075 --max-val-tokens-per-domain 2500000
fi
built=$(key data/study/manifest.json)
if [[ ${1:-} == head ]]; then
  rm -rf .carry/study_head
  "$PY" -c "from hwattn.data.build import head_build; head_build('data/study', '.carry/study_head', 4_000_000)"
  du -sm .carry/study_head
  (( $(du -sm .carry/study_head | cut -f1) < 56 )) || { echo ".carry/study_head is too large to carry" >&2; exit 1; }
  echo "head of build $built written to .carry/study_head ($(( SECONDS - t0 )) s)"
  exit 0
fi
rm -rf data/study_pack .carry/pack_a .carry/pack_b
"$PY" -m hwattn data pack data/study --out data/study_pack
mkdir -p .carry/pack_a .carry/pack_b
cp data/study_pack/train.bin.00[012]* .carry/pack_a/
cp data/study_pack/* .carry/pack_b/ && rm .carry/pack_b/train.bin.00[012]*
du -sm .carry/pack_a .carry/pack_b
for d in .carry/pack_a .carry/pack_b; do
  (( $(du -sm "$d" | cut -f1) < 64 )) || { echo "$d is 64 MiB or more: split the pack differently" >&2; exit 1; }
done
echo "build key $built ($(( SECONDS - t0 )) s)"
if [[ $built != "$want" ]]; then
  echo "the study's runs were made on build $want: this corpus is not theirs" >&2
  exit 1
fi
