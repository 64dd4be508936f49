"""The ops tests run the Triton kernels on CPU tensors under Triton's interpreter, which must be
switched on before triton is imported (the kernel modules are imported lazily, in the tests)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
