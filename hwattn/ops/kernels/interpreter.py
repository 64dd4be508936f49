"""Fixes for running the kernels under Triton 3.6's interpreter (TRITON_INTERPRET=1) on CPU.

1. The interpreter represents every scalar as a NumPy array of shape (1,) and turns one into
   a Python int with `int(array)`, which NumPy 2.4 refuses ("only 0-dimensional arrays can be
   converted"); every loop whose bounds are loaded from memory then fails.
2. It stores bf16 as raw uint16 bits and multiplies those integers in `tl.dot`.
3. Its round-to-nearest-even conversion to fp8 drops the carry when rounding up crosses a power
   of two (126.9 becomes 64 instead of 128).

`patch()` makes the scalar conversion read the single element, widens bf16 dot operands to fp32
(exact, as the tensor cores' products are) and converts to and from fp8 through PyTorch. It
changes nothing when kernels are compiled.
"""

from __future__ import annotations

import numpy as np
import torch


def patch() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    original_patch = interpreter._patch_lang_tensor
    if getattr(original_patch, "hwattn_patched", False):
        return
    builder = interpreter.InterpreterBuilder
    torch_dtypes = {tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2,
                    tl.bfloat16: torch.bfloat16, tl.float16: torch.float16, tl.float32: torch.float32}
    storage = {1: torch.uint8, 2: torch.int16, 4: torch.int32}

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16  # bf16 is the top half of an fp32
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    original_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    original_fp_to_fp = builder.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        src_ty, dst_ty = src.dtype.scalar, dst_type.scalar
        if not (src_ty.is_fp8() or dst_ty.is_fp8()) or src_ty not in torch_dtypes \
                or dst_ty not in torch_dtypes:
            return original_fp_to_fp(self, src, dst_type, rounding_mode)
        data = np.ascontiguousarray(src.data)
        value = torch.from_numpy(data.view(f"i{data.itemsize}") if data.itemsize > 1 else data)
        value = value.view(storage[data.itemsize]).view(torch_dtypes[src_ty]).to(torch_dtypes[dst_ty])
        bits = value.view(storage[value.element_size()]).numpy()
        return interpreter.TensorHandle(bits.view(interpreter._get_np_dtype(dst_ty)), dst_ty)

    patch_lang_tensor.hwattn_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    builder.create_dot = create_dot
    builder.create_fp_to_fp = create_fp_to_fp
