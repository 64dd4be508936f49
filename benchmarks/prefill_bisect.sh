#!/usr/bin/env bash
# Times the `xl` prefill rows of MLA and GLA-2 (benchmarks/engine_roofline.py --parts prefill)
# on older trees beside this one, in one device call, to find which commit made the latent
# variants' chunked prefill slower (run 12, 2026-12-06: chunked MLA 117.3 -> 128.6 ms against
# run 5's tree 682cc29; the latent paged op on unequal prompts +5.7-5.9%; whole prompts level).
#   on this machine: bash benchmarks/prefill_bisect.sh pack [REV ...]   # into data/bisect/ (ignored)
#   on the GPU (carry data/bisect): bash benchmarks/prefill_bisect.sh run
# Each tree is its hwattn/ and this script's timing script at that commit; this tree runs first
# and last (the clocks' drift between them bounds what a difference means).
set -o pipefail
case ${1:-} in
  pack)
    shift
    revs=${*:-682cc29 64c979f^ 64c979f aaa61a6 8a43d15 4f87ad1}
    rm -rf data/bisect && mkdir -p data/bisect
    for r in $revs; do
      d=data/bisect/$(echo "$r" | tr '^~' 'pt')
      mkdir -p "$d" && git archive "$r" hwattn benchmarks/engine_roofline.py | tar -x -C "$d"
      echo "$r" > "$d/REV"
    done
    du -sh data/bisect ;;
  run)
    export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/prefill_bisect}; mkdir -p "$OUT"
    one() {
      (cd "$1" && PYTHONPATH=$PWD timeout 100 python3 benchmarks/engine_roofline.py --parts prefill \
        --variants mla,gla-2 --out "$OUT/$2" > "$OUT/$2.log" 2>&1)
      grep -E "^\| (mla|gla-2) \| (1 x 8192|4 x 2048)" "$OUT/$2.log" | sed "s/^/$2 /"
    }
    one . this-tree-1
    for d in data/bisect/*/; do one "$d" "$(basename "$d")"; done
    one . this-tree-2 ;;
  *) echo "usage: $0 pack [REV ...] | run"; exit 2 ;;
esac
