"""Optional Triton kernels. Each has a PyTorch reference in minilora/ that it equals bit for bit.

`dequantize(q, dtype)` picks: the Triton kernel when triton imports and the weight is on CUDA (or
TRITON_INTERPRET=1, which runs the kernel on CPU tensors in Triton's interpreter), else the reference.
"""
import os

import torch

from minilora.nf4 import NF4Weight, dequantize_nf4


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    # the device test first: importing triton takes seconds, and a CPU tensor never needs it
    return (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and triton_available()


def dequantize(q: NF4Weight, dtype: torch.dtype = None) -> torch.Tensor:
    """doubleDequant(c1, c2, W_NF4) in `dtype` (default: the original), by kernel or reference."""
    if use_triton(q.packed):
        from minilora.kernels.nf4_dequant import dequantize_nf4_triton

        return dequantize_nf4_triton(q, dtype)
    return dequantize_nf4(q, dtype)
