"""What a compiled kernel is made of, read without a GPU: registers, spills and shared memory,
its SASS and its PTX, with the cuobjdump that ships with Triton (no CUDA toolkit needed).

    resources(kernel)        registers per thread, spill bytes, shared bytes
    programs_per_sm(...)     how many programs of it one Hopper SM holds at once
    signature(...)           the signature and attributes `triton.compile` takes for a kernel
    sass(cubin)              the SASS instructions, names and section headers dropped
    ptx_code(ptx)            the PTX without its debug information

`kernel` is what `triton.compile` returns (e.g. `hopper_decode.compile_sm90`), `cubin` and
`ptx` its `asm["cubin"]` and `asm["ptx"]`. Comparing the digests of `ptx_code` before and
after a change tells whether the change can alter what the GPU computes
(`tests/ops/hopper_fingerprint.py`, `benchmarks/decode_compile.py`).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton

__all__ = ["cuobjdump", "programs_per_sm", "ptx_code", "resources", "sass", "signature"]


def cuobjdump(cubin: bytes, option: str) -> str:
    """The text `cuobjdump <option>` prints for a cubin (e.g. '-res-usage', '-sass'), with the
    cuobjdump that ships with Triton (no CUDA toolkit needed)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, option, f.name], capture_output=True, text=True,
                              check=True).stdout


def sass(cubin: bytes) -> str:
    """The cubin's SASS, instructions only (function names and section headers dropped), so
    that two builds of the same code compare equal."""
    return "\n".join(line.strip() for line in cuobjdump(cubin, "-sass").splitlines()
                     if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line) or line.strip().startswith("/* 0x"))


def ptx_code(ptx: str) -> str:
    """A kernel's PTX without its debug information (line directives, debug labels and the
    DWARF sections): what ptxas is asked to compute. Two builds whose code is the same compare
    equal even when their source lines moved, which can still perturb ptxas's scheduling (and
    so their SASS) through the line information."""
    body = ptx.split("\t.section\t.debug", 1)[0]
    return "\n".join(line.split("//")[0].rstrip() for line in body.splitlines()
                     if not re.match(r"\s*(\.loc|\.file)\b|\$L__tmp\d+:$", line.strip())
                     and line.split("//")[0].strip())


def resources(kernel) -> dict[str, int]:
    """Registers per thread, spill (local) bytes and shared bytes of a compiled kernel, read
    from its cubin."""
    text = cuobjdump(kernel.asm["cubin"], "-res-usage")
    found = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return dict(registers=found.get("REG", -1), spill_bytes=found.get("LOCAL", 0) + found.get("STACK", 0),
                shared_bytes=kernel.metadata.shared)


def programs_per_sm(res: dict[str, int], threads: int) -> int:
    """How many programs of a kernel one sm_90 SM holds at once, from its `resources` and
    threads per program: the fewest that its registers (allocated per warp in units of 256,
    65,536 an SM), its shared memory (228 KiB an SM, 1 KiB reserved per program) and its warps
    (64 an SM) allow."""
    warps = -(-threads // 32)
    per_warp = -(-res["registers"] * 32 // 256) * 256
    by_registers = 65536 // (per_warp * warps)
    by_shared = 233472 // (res["shared_bytes"] + 1024)
    return min(by_registers, by_shared, 64 // warps, 32)


def signature(arg_names, constexprs: dict, pointers: dict[str, str], floats=(),
              aligned=lambda name: False) -> tuple[dict, dict]:
    """(signature, attrs) for compiling a `@triton.jit` kernel ahead of time (`ASTSource`):
    `constexprs` by name, pointers to the element types of `pointers` (e.g. "bf16"), aligned
    to 16 bytes, `floats` fp32, every other argument i32, those `aligned(name)` marked
    divisible by 16 (as a launch specialises strides that are)."""
    types, attrs = {}, {}
    for i, name in enumerate(arg_names):
        if name in constexprs:
            types[name] = "constexpr"
        elif name in pointers:
            types[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            types[name] = "fp32"
        else:
            types[name] = "i32"
            if aligned(name):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return types, attrs
