"""Machine-code fingerprints of the Hopper decode kernel, for refactoring it without a GPU.

    python -m tests.ops.hopper_fingerprint --out before.json      # on the tree before a change
    python -m tests.ops.hopper_fingerprint --out after.json --against before.json

Compiles every case of the sm_90 compile test (`test_hopper_decode.CASES`: each launch layout
in each schedule, and the default config of every measured shape class) with ptxas, as
`compile_sm90` does on any machine, disassembles each cubin with the cuobjdump that ships with
Triton, and records a SHA-256 of its SASS (instructions only: the function name and the
`.section` headers are dropped). A change whose fingerprints all equal the old tree's compiled
to the same instructions for every case, so it cannot change what the GPU computes there
(e.g. code folded into `@gluon.jit` helpers, which Gluon inlines). Any difference is listed
with its case; `--against` exits 1 when one is found.

Run it without TRITON_INTERPRET (the interpreter replaces functions the Gluon compiler needs).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from hwattn.ops import hopper_decode
from hwattn.ops.hopper_decode import HopperConfig, TiedShape


def sass(cubin: bytes) -> str:
    """The cubin's SASS with only the instructions (names and section headers dropped)."""
    keep = [line.strip() for line in hopper_decode.cuobjdump(cubin, "-sass").splitlines()
            if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line) or line.strip().startswith("/* 0x")]
    return "\n".join(keep)


def fingerprint(pair: tuple[dict, dict]) -> dict:
    """Compile one (shape fields, config fields) pair; its SASS digest and resources."""
    shape, config = TiedShape(**pair[0]), HopperConfig(**pair[1])
    kernel, _ = hopper_decode.compile_sm90(shape, config)
    code = sass(kernel.asm["cubin"])
    return dict(sha256=hashlib.sha256(code.encode()).hexdigest(),
                instructions=code.count("\n") // 2 + 1, **hopper_decode.resources(kernel))


def cases() -> dict[str, tuple[dict, dict]]:
    """{'shape-variant': (shape fields, config fields)} for every compile-test case."""
    from tests.ops import test_hopper_decode as t

    shapes = {p.id: p.values[0] for p in t.COMPILE_SHAPES + t.DEFAULT_SHAPES}
    return {f"{sid}-{variant}": (dataclasses.asdict(shapes[sid]),
                                 dataclasses.asdict(t._config(shapes[sid], variant)))
            for sid, variant in t.CASES}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file of {case: fingerprint} to write")
    p.add_argument("--against", help="an earlier --out file to compare with (exit 1 on a difference)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the Gluon compiler does not run under the interpreter")

    todo = cases()
    unique = {json.dumps(pair, sort_keys=True): pair for pair in todo.values()}
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        done = dict(zip(unique, pool.map(fingerprint, unique.values())))
    result = {name: done[json.dumps(pair, sort_keys=True)] for name, pair in todo.items()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    print(f"{len(unique)} kernels compiled for sm_90 in {time.time() - t0:.0f} s "
          f"({len(result)} cases) -> {args.out}")
    if not args.against:
        return 0
    with open(args.against) as f:
        old = json.load(f)
    differ = [name for name in sorted(set(old) | set(result))
              if old.get(name, {}).get("sha256") != result.get(name, {}).get("sha256")]
    for name in differ:
        a, b = old.get(name), result.get(name)
        print(f"  differs: {name}: " + (" -> ".join(
            "absent" if r is None else f"{r['instructions']} instr, {r['registers']} regs"
            for r in (a, b))))
    print(f"{len(result) - len(differ)} of {len(result)} cases compile to the same SASS"
          + (f"; {len(differ)} differ" if differ else ""))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
