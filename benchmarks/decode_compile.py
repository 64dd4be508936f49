"""Compile the decode kernel for Hopper (sm_90a) on any machine, GPU or not, and print what the
compiler made of each benchmark shape: shared memory, registers, local-memory (spill) bytes and
whether the matrix products became wgmma, and digests of its PTX (debug information left out)
and SASS to tell whether a change altered the code. Costs no device time; run before a GPU call.

    python benchmarks/decode_compile.py                  # the default shapes and configs
    python benchmarks/decode_compile.py --ptx gla2-lq1   # also dump that shape's PTX
"""

from __future__ import annotations

import argparse
import hashlib
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hwattn.ops.kernel_code import ptx_code, resources, sass, signature
from hwattn.ops.kernels.attend import attend_kernel
from hwattn.ops.triton_decode import KernelConfig, choose_config, head_layout

# name: (tied, H_q, H_kv, D_qk, D_v, D_R, L_q, page, cache dtype)
SHAPES = {
    "gla2-lq1": (True, 128, 2, 256, 256, 64, 1, 64, "bf16"),
    "gla2-lq2": (True, 128, 2, 256, 256, 64, 2, 64, "bf16"),
    "mla-lq1": (True, 128, 1, 512, 512, 64, 1, 64, "bf16"),
    "mla-lq2": (True, 128, 1, 512, 512, 64, 2, 64, "bf16"),
    "gta4-lq1": (True, 32, 4, 64, 128, 64, 1, 64, "bf16"),
    "gqa4-lq1": (False, 32, 4, 128, 128, 0, 1, 64, "bf16"),
    "mqa-lq1": (False, 32, 1, 128, 128, 0, 1, 64, "bf16"),
    "gqa-tp8-lq1": (False, 4, 1, 128, 128, 0, 1, 64, "bf16"),
    "gla2-lq1-fp8": (True, 128, 2, 256, 256, 64, 1, 64, "fp8e4nv"),
    "gqa4-lq1-page16": (False, 32, 4, 128, 128, 0, 1, 16, "bf16"),
}


def compile_shape(shape, config: KernelConfig | None = None):
    tied, h_q, h_kv, d_qk, d_v, d_r, l_q, page, cache_ty = shape
    group = h_q // h_kv
    d_pad = triton.next_power_of_2(d_v)
    os.environ.pop("TRITON_INTERPRET", None)
    config = config or choose_config(d_pad, l_q, group, tied)
    heads, blocks, block_m = head_layout(group, l_q, config.max_rows)
    constexprs = dict(L_Q=l_q, HEADS_PER_PROG=heads, HEAD_BLOCKS=blocks, BLOCK_M=block_m,
                      BLOCK_N=config.block_n, D_QK=d_qk, D_V=d_v, D_PAD=d_pad, D_R=max(d_r, 16),
                      DR_PAD=max(16, triton.next_power_of_2(max(d_r, 16))), PAGE=page, TIED=tied,
                      DOT_PRECISION="tf32")
    pointer_types = dict(q_ptr="bf16", q_rope_ptr="bf16", k_ptr=cache_ty, v_ptr=cache_ty,
                         rope_ptr=cache_ty, block_table_ptr="i32", seqlens_ptr="i32",
                         items_ptr="i32", splits_ptr="i32", out_ptr="bf16", lse_ptr="fp32",
                         part_out_ptr="fp32", part_lse_ptr="fp32")
    types, attrs = signature(attend_kernel.arg_names, constexprs, pointer_types,
                             floats=("qk_scale", "v_scale"),
                             aligned=lambda name: name.startswith("stride"))
    src = ASTSource(fn=attend_kernel, signature=types, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return kernel, config, block_m


def digest(text: str) -> str:
    """The first 12 hex digits of a text's SHA-256: compare runs before and after a change
    (the PTX digest ignores debug information; see hwattn.ops.kernel_code.ptx_code)."""
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help="comma-separated names of SHAPES in this file to compile (default: "
                             "all of them)")
    parser.add_argument("--ptx", help="dump the PTX of this shape to /tmp/<shape>.ptx")
    parser.add_argument("--block-n", type=int,
                        help="tokens per loop step (BLOCK_N) for every shape (default: "
                             "choose_config's choice per shape)")
    parser.add_argument("--warps", type=int,
                        help="num_warps for every shape (default: choose_config's choice)")
    parser.add_argument("--stages", type=int,
                        help="num_stages (software pipelining) for every shape (default: "
                             "choose_config's choice)")
    parser.add_argument("--max-rows", type=int,
                        help="cap on the rows (query heads × L_q) of one program for every shape "
                             "(default: choose_config's choice)")
    args = parser.parse_args()
    print(f"{'shape':18} {'block_n':>7} {'warps':>5} {'stages':>6} {'M':>4} {'smem KB':>8} "
          f"{'regs':>5} {'local B':>7} {'wgmma':>5} {'PTX sha256':>12} {'SASS sha256':>12}")
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        config = None
        if args.block_n or args.warps or args.stages or args.max_rows:
            base = choose_config(triton.next_power_of_2(shape[4]), shape[6], shape[1] // shape[2], shape[0])
            config = KernelConfig(args.block_n or base.block_n, args.warps or base.num_warps,
                                  args.stages or base.num_stages, args.max_rows or base.max_rows)
        kernel, config, block_m = compile_shape(shape, config)
        res = resources(kernel)
        ptx = kernel.asm["ptx"]
        wgmma = ptx.count("wgmma.mma_async")
        print(f"{name:18} {config.block_n:7} {config.num_warps:5} {config.num_stages:6} {block_m:4} "
              f"{res['shared_bytes'] / 1024:8.1f} {res['registers']:5} {res['spill_bytes']:7} {wgmma:5} "
              f"{digest(ptx_code(ptx)):>12} {digest(sass(kernel.asm['cubin'])):>12}")
        if args.ptx == name:
            with open(f"/tmp/{name}.ptx", "w") as f:
                f.write(ptx)


if __name__ == "__main__":
    main()
