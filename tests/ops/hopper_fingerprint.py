"""Code fingerprints of the Hopper decode kernel, for refactoring it without a GPU.

    python -m tests.ops.hopper_fingerprint --out before.json      # on the tree before a change
    python -m tests.ops.hopper_fingerprint --out after.json --against before.json

Compiles every case of the sm_90 compile test (`test_hopper_decode.CASES`: each launch layout
in each schedule, and the default config of every measured shape class) with ptxas, as
`compile_sm90` does on any machine, and records two SHA-256 digests per case:
- `ptx`: the PTX without its debug information (`kernel_code.ptx_code`), i.e. what ptxas is
  asked to compute. Equal digests mean the change cannot alter what the GPU computes there
  (e.g. code folded into `@gluon.jit` helpers, which Gluon inlines).
- `sass`: the instructions ptxas made (`kernel_code.sass`). They can differ while the PTX is
  the same, because moved source lines change the line information ptxas schedules with;
  equal digests mean the very same machine code.
`--against` lists every case whose digests differ from an earlier run's and exits 1 when a PTX
digest does.

Run it without TRITON_INTERPRET (the interpreter replaces functions the Gluon compiler needs).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

from hwattn.ops import hopper_decode, kernel_code
from hwattn.ops.hopper_decode import HopperConfig, TiedShape


def fingerprint(pair: tuple[dict, dict]) -> dict:
    """Compile one (shape fields, config fields) pair; its SASS digest and resources."""
    shape, config = TiedShape(**pair[0]), HopperConfig(**pair[1])
    kernel, _ = hopper_decode.compile_sm90(shape, config)
    code = kernel_code.sass(kernel.asm["cubin"])
    ptx = kernel_code.ptx_code(kernel.asm["ptx"])
    return dict(ptx=hashlib.sha256(ptx.encode()).hexdigest(),
                sass=hashlib.sha256(code.encode()).hexdigest(),
                instructions=code.count("\n") // 2 + 1, **kernel_code.resources(kernel))


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
    def changed(key):
        return [name for name in sorted(set(old) | set(result))
                if old.get(name, {}).get(key) != result.get(name, {}).get(key)]

    ptx, machine = changed("ptx"), changed("sass")
    for name in machine:
        a, b = old.get(name), result.get(name)
        print(f"  {'code' if name in ptx else 'SASS only'} differs: {name}: " + (" -> ".join(
            "absent" if r is None else f"{r['instructions']} instr, {r['registers']} regs"
            for r in (a, b))))
    print(f"{len(result) - len(ptx)} of {len(result)} cases compile to the same PTX, "
          f"{len(result) - len(machine)} to the same SASS")
    return 1 if ptx else 0

if __name__ == "__main__":
    sys.exit(main())
