"""The decode step's Triton kernels compile for sm_90 without a GPU (Triton's NVIDIA
backend and its ptxas run on the CPU). The interpreter, which the other CPU tests use, runs
code the compiler refuses: `store_states_kernel` bound one name to two shapes in the branches
of an `if`, passed every interpreter test, and failed to compile on an H100 (2026-12-07).
The Hopper attention kernel has its own compile test (test_hopper_decode.py), the prefill
kernel its own (test_prefill_occupancy.py).

The tests run under TRITON_INTERPRET=1, where `triton.jit` makes interpreted functions that
cannot be compiled, so the compiling happens in a child process without it
(`python -m tests.ops.test_sm90_compile`, which prints one line per kernel and variant)."""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys

import pytest

COMBINE_POINTERS = dict(part_out_ptr="fp32", part_lse_ptr="fp32", splits_ptr="i32",
                        out_ptr="bf16", lse_ptr="fp32")


def _compile_sm90(fn, pointers: dict[str, str], constexprs: dict, floats: tuple = (),
                  options: dict | None = None):
    """Compile a `triton.jit` kernel for sm_90 (`kernel_code.signature`: pointers typed by
    `pointers`, `floats` fp32, every other argument i32; `options` for `triton.compile`,
    default 4 warps). Returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hwattn.ops.kernel_code import signature

    types, attrs = signature(fn.arg_names, constexprs, pointers, floats=floats)
    source = ASTSource(fn=fn, signature=types, constexprs=constexprs, attrs=attrs)
    options = dict(options or {"num_warps": 4})
    if constexprs.get("PDL"):  # as `hwattn.ops.kernels.pdl.launch_options` launches it
        options["launch_pdl"] = True
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def cases():
    """(name, kernel, pointers, constexprs, fp32 arguments[, compile options]) of every Triton
    kernel variant compiled."""
    import triton

    from hwattn.ops.kernels import combine, store

    for l_q, d_v, block_p, block_d in [(1, 512, 16, 512), (2, 256, 64, 128)]:
        common = dict(L_Q=l_q, D_V=d_v, BLOCK_P=block_p, BLOCK_D=block_d, PDL=l_q == 2)
        yield f"combine_kernel {common}", combine.combine_kernel, COMBINE_POINTERS, common, ()
        strided = dict(common, N_DBLOCKS=triton.cdiv(d_v, block_d), BLOCK_B=1 if l_q == 1 else 64)
        yield (f"combine_strided_kernel {strided}", combine.combine_strided_kernel,
               COMBINE_POINTERS, strided, ())
    from hwattn.ops.kernels.attend import attend_kernel
    from hwattn.ops.triton_decode import choose_config, head_layout, pad_width

    # The portable decode kernel as `triton_decode._attend` launches it: GQA-4 (separate K/V),
    # GLA-2 (tied, a RoPE key) at L_q 2, and GTA-4 with an fp8 cache.
    for name, group, l_q, d_qk, d_v, d_r, tied, cache in [
            ("gqa-4", 4, 1, 128, 128, 16, False, "bf16"),
            ("gla-2", 64, 2, 256, 256, 64, True, "bf16"),
            ("gta-4 fp8", 8, 1, 64, 128, 64, True, "fp8e4nv")]:
        config = choose_config(pad_width(d_v), l_q, group, tied)
        heads, head_blocks, block_m = head_layout(group, l_q, config.max_rows)
        attend = dict(L_Q=l_q, HEADS_PER_PROG=heads, HEAD_BLOCKS=head_blocks, BLOCK_M=block_m,
                      BLOCK_N=config.block_n, D_QK=d_qk, D_V=d_v, D_PAD=pad_width(d_v), D_R=d_r,
                      DR_PAD=pad_width(d_r), PAGE=64, TIED=tied, DOT_PRECISION="tf32",
                      PDL=tied)
        pointers = dict(q_ptr="bf16", q_rope_ptr="bf16", k_ptr=cache, v_ptr=cache, rope_ptr=cache,
                        block_table_ptr="i32", seqlens_ptr="i32", items_ptr="i32",
                        splits_ptr="i32", out_ptr="bf16", lse_ptr="fp32", part_out_ptr="fp32",
                        part_lse_ptr="fp32")
        yield (f"attend_kernel {name} {config}", attend_kernel, pointers, attend,
               ("qk_scale", "v_scale"),
               dict(num_warps=config.num_warps, num_stages=config.num_stages))
    for pdl in (False, True):
        rows = dict(D_V=512, BLOCK_R=4, BLOCK_D=512, PDL=pdl)
        yield f"combine_rows_kernel {rows}", combine.combine_rows_kernel, COMBINE_POINTERS, rows, ()
    for cache, scaled in [("bf16", False), ("fp8e4nv", True)]:
        pointers = dict(cache_a_ptr=cache, new_a_ptr="bf16", norm_ptr="bf16", cache_b_ptr=cache,
                        new_b_ptr="bf16", cos_ptr="fp32", sin_ptr="fp32", slots_ptr="i64",
                        cache_ptr=cache, new_ptr="bf16")
        flags = dict(SCALED=scaled, SATURATE=scaled, PDL=scaled)
        for norm, rope in [(True, True), (False, True), (False, False)]:
            finish = dict(flags, NORM=norm, ROPE=rope, BLOCK_D=256, BLOCK_R=32)
            yield (f"store_states_kernel {cache} {finish}", store.store_states_kernel, pointers,
                   finish, ("eps", "scale"))
        yield (f"store_kernel {cache}", store.store_kernel, pointers, dict(flags, BLOCK=128),
               ("scale",))
        yield (f"store_pair_kernel {cache}", store.store_pair_kernel, pointers,
               dict(flags, BLOCK_A=512, BLOCK_B=64), ("scale",))


def check_pdl(ptx: str, pdl: bool | None) -> None:
    """A kernel compiled with PDL waits for its predecessor and lets the next kernel launch
    (`hwattn.ops.kernels.pdl`); one compiled without it does neither."""
    for instruction in ("griddepcontrol.wait", "griddepcontrol.launch_dependents"):
        assert (instruction in ptx) == bool(pdl), f"PDL={pdl}: {instruction} in the PTX: {not pdl}"


def _compile_hopper_pdl():
    """The Hopper (Gluon) decode kernel at GLA-2's `xl` decode shape, its default config,
    compiled as HWATTN_PDL launches it."""
    from hwattn.ops import hopper_decode

    shape = hopper_decode.TiedShape(256, 256, 64, 8, 1)
    config = hopper_decode.choose_config(256, 256, 64, 8, 1)
    return hopper_decode.compile_sm90(shape, config, pdl=True)[0]


def builds():
    """(name, compiled with PDL, a call that compiles it) of every case: the Triton kernels'
    `cases` and the Gluon kernel under PDL."""
    for name, fn, pointers, constexprs, floats, *options in cases():
        yield (name, constexprs.get("PDL"),
               functools.partial(_compile_sm90, fn, pointers, constexprs, floats, *options))
    yield "hopper_decode_kernel gla-2 xl PDL", True, _compile_hopper_pdl


def main() -> int:
    """Compile every case; print `ok NAME` or `FAILED NAME: error`; exit 1 on any failure."""
    failed = 0
    for name, pdl, build in builds():
        try:
            kernel = build()
            assert kernel.asm["cubin"], "no cubin"
            check_pdl(kernel.asm["ptx"], pdl)
            print(f"ok {name}", flush=True)
        except Exception as err:  # noqa: BLE001 - every failure is reported by name
            failed += 1
            print(f"FAILED {name}: {type(err).__name__}: {str(err).splitlines()[-1][:300]}",
                  flush=True)
    return 1 if failed else 0


def _nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.exists(os.path.join(tools, "ptxas"))


@pytest.mark.skipif(not _nvidia_backend(), reason="Triton without its NVIDIA backend (ptxas)")
def test_decode_kernels_compile_for_sm90():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=root)
    done = subprocess.run([sys.executable, "-m", "tests.ops.test_sm90_compile"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, "\n".join(lines + done.stderr.splitlines()[-20:])
    assert sum(line.startswith("ok ") for line in lines) == len(list(builds())), lines


if __name__ == "__main__":
    sys.exit(main())
