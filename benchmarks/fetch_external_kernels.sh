#!/usr/bin/env bash
# Prebuilt FlashMLA and FlashAttention-3 (Hopper) for `hwattn bench decode` on the GPU machines,
# which have no network, no such packages and no sources to build them from. vLLM 0.26.0's
# x86-64 wheel is built for their stack (torch 2.11.0, CUDA 13.0) and carries both as standalone
# torch-op libraries: vllm/_flashmla_C.abi3.so (FlashMLA's dense paged decode, 1.7 MiB) and
# vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so (vLLM's fork of FA3's Hopper kernels, 146 MiB).
# This downloads that wheel (290 MiB, pinned by version and sha256) into a cache outside the
# repository, takes out the two libraries, checks their sha256, xz-compresses them into the
# git-ignored .ext/ (about 8 MiB together) and writes .ext/MANIFEST.json, which
# hwattn/bench/external_carried.py reads. Nothing of vLLM's Python code is used.
#
#   bash benchmarks/fetch_external_kernels.sh        # here, with network access (about 2 min:
#                                                    # xz at its highest preset takes ~70 s)
#   HWATTN_WHEEL_CACHE=DIR ...                       # where the wheel is kept (default
#                                                    # ~/.cache/hwattn-ext-wheels; reused)
#
# There (docs/external_baselines.md, "Prebuilt, carried"): carry `.ext` and set
#   HWATTN_EXTERNAL_DIR=.ext python3 -m hwattn bench decode --variants mla,gla-2,gqa-4 ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_VERSION=0.26.0
WHEEL=vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
WHEEL_SHA256=adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de
CACHE=${HWATTN_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hwattn-ext-wheels}
mkdir -p "$CACHE"

wheel_ok() {
  [ -f "$CACHE/$WHEEL" ] && "$PY" - "$CACHE/$WHEEL" "$WHEEL_SHA256" <<'PY'
import hashlib, sys
digest = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
        digest.update(block)
sys.exit(digest.hexdigest() != sys.argv[2])
PY
}

if ! wheel_ok; then
  rm -f "$CACHE/$WHEEL"
  req=$(mktemp)
  trap 'rm -f "$req"' EXIT
  echo "vllm==$VLLM_VERSION --hash=sha256:$WHEEL_SHA256" > "$req"
  echo "downloading $WHEEL (290 MiB) into $CACHE"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --require-hashes -r "$req" -d "$CACHE"
  wheel_ok || { echo "error: $CACHE/$WHEEL missing or not sha256 $WHEEL_SHA256" >&2; exit 1; }
fi

rm -rf .ext && mkdir -p .ext
"$PY" - "$CACHE/$WHEEL" "$WHEEL_SHA256" "$VLLM_VERSION" <<'PY'
import hashlib, json, lzma, os, sys, zipfile

wheel, wheel_sha, version = sys.argv[1:4]
# name -> (member of the wheel, sha256 of the library: what the wheel's RECORD says)
KERNELS = {
    "FlashMLA": ("vllm/_flashmla_C.abi3.so",
                 "259628e42733acf27af895a1a0a9f5a41a50f6755a8ebb95d2fbdb9ebb41b5e0"),
    "FA3": ("vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so",
            "ef90b69390afc0e579be5d12c57598879d57efe2fe38cecf05a9268f9bdd1cf3"),
}
manifest = dict(
    format=1, source=f"vllm=={version}", wheel=os.path.basename(wheel), wheel_sha256=wheel_sha,
    torch="2.11.0", cuda="13.0", platform="x86_64 Linux, sm_90a (H100/H200)",
    needs="torch 2.11.0 (CUDA 13.0) imported first: libtorch*, libc10*, libcudart.so.13; "
          "libcuda.so.1 from the driver",
    kernels={})
total = 0
with zipfile.ZipFile(wheel) as z:
    for name, (member, sha) in KERNELS.items():
        data = z.read(member)
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            sys.exit(f"error: {member} has sha256 {got}, expected {sha}")
        file = os.path.basename(member) + ".xz"
        packed = lzma.compress(data, preset=9)
        with open(os.path.join(".ext", file), "wb") as f:
            f.write(packed)
        total += len(packed)
        manifest["kernels"][name] = dict(file=file, member=member, sha256=sha, bytes=len(data))
        print(f"{name:8s} {member}: {len(data) / 2**20:6.1f} MiB -> .ext/{file} "
              f"{len(packed) / 2**20:5.1f} MiB", flush=True)
with open(os.path.join(".ext", "MANIFEST.json"), "w") as f:
    json.dump(manifest, f, indent=1)
print(f"total carried: {total / 2**20:.1f} MiB (+ MANIFEST.json)")
PY
du -sh .ext
