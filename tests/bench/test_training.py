"""The training-step kernel breakdown (`hwattn.bench.training`) on kernel names as H200
traces spell them."""

import pytest

from hwattn.bench.training import TRAIN_PARTS, classify_training_kernel, train_breakdown

NAMES = {
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128, 64, 4>, true>":
        "attention",
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>":
        "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1": "attention",
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN": "gemm",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_nn_align8>":
        "gemm",
    "triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0": "fused",
    "triton_poi_fused_cat_clone_1": "fused",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>":
        "optimizer",
    "Memcpy HtoD (Pinned -> Device)": "copy",
    "Memset (Device)": "copy",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned int, 3>": "copy",
    "void at::native::indexing_backward_kernel<c10::BFloat16, 4>": "other",
}


@pytest.mark.parametrize("name,part", NAMES.items())
def test_kernels_are_put_on_their_part(name, part):
    assert classify_training_kernel(name) == part


def test_breakdown_is_per_step_and_sums_to_the_kernels():
    kernels = [(n, 1e-3 * (i + 1)) for i, n in enumerate(NAMES)] * 2  # two steps
    b = train_breakdown(kernels, steps=2, top=3)
    expect = {p: sum(1e-3 * (i + 1) for i, (n, q) in enumerate(NAMES.items()) if q == p)
              for p in TRAIN_PARTS}
    for p in TRAIN_PARTS:
        assert b[f"{p}_s"] == pytest.approx(expect[p])
    assert b["kernels_s"] == pytest.approx(sum(expect.values()))
    assert b["kernels_per_step"] == len(NAMES)
    assert [t["part"] for t in b["top"]] == ["other", "copy", "copy"]  # the three longest
    assert b["top"][0]["per_step"] == 1 and b["top"][0]["us"] == pytest.approx(1e3 * len(NAMES))
    with pytest.raises(ValueError, match="steps"):
        train_breakdown(kernels, steps=0)
