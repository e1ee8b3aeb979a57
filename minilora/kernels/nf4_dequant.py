"""One Triton kernel for QLoRA's doubleDequant(c1, c2, W_NF4) (arXiv 2305.14314, eq. 5), both levels in one pass.

Each program reads TILE packed bytes and writes the 2·TILE weights they hold:
    q_hi, q_lo = byte >> 4, byte & 15                      # first element in the high nibble
    s_b = DYNAMIC_CODE[absmax_b] · c1[b // block_size2]    # fp32 product, rounded
    s_b = s_b + offset                                      # fp32 sum, rounded (no FMA: see enable_fp_fusion)
    w   = code[q] · s_b  → out dtype (round to nearest even)
which is minilora.nf4.dequantize_nf4 operation for operation, so the two agree bit for bit.
Both elements of a byte share a block because block_size is even.
"""
import torch

import triton
import triton.language as tl

from minilora.nf4 import DYNAMIC_CODE, NF4Weight

TILE = 1024  # bytes per program → 2048 weights


@triton.jit
def _dequant_4bit_kernel(packed_ptr, code_ptr, absmax_ptr, dyn_code_ptr, absmax_scale_ptr, offset_ptr, out_ptr,
                         n,  # weights to write
                         BLOCK_SIZE: tl.constexpr, BLOCK_SIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                         OUT_BF16: tl.constexpr, TILE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: 8192 × 28672 weights is close to 2^31
    byte_idx = pid * TILE + tl.arange(0, TILE)  # (TILE,)
    byte_mask = 2 * byte_idx < n
    byte = tl.load(packed_ptr + byte_idx, mask=byte_mask, other=0).to(tl.int32)
    v_hi = tl.load(code_ptr + (byte >> 4))  # (TILE,) fp32 code values, 16-entry table
    v_lo = tl.load(code_ptr + (byte & 15))

    block = (2 * byte_idx) // BLOCK_SIZE  # level-1 block of both elements
    if DOUBLE_QUANT:
        c2_code = tl.load(absmax_ptr + block, mask=byte_mask, other=0).to(tl.int32)
        c1 = tl.load(absmax_scale_ptr + block // BLOCK_SIZE2, mask=byte_mask, other=0.0)
        scale = tl.load(dyn_code_ptr + c2_code) * c1 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=byte_mask, other=0.0)

    out = tl.interleave(v_hi * scale, v_lo * scale)  # (2·TILE,) fp32: hi, lo, hi, lo, …
    if OUT_BF16:  # round to nearest even by hand: Triton's interpreter would truncate; the GPU gives the same bits
        bits = out.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    out_idx = 2 * pid * TILE + tl.arange(0, 2 * TILE)
    tl.store(out_ptr + out_idx, out.to(out_ptr.dtype.element_ty), mask=out_idx < n)  # fp16: RNE; fp32: as is


def dequantize_nf4_triton(q: NF4Weight, dtype: torch.dtype = None) -> torch.Tensor:
    """doubleDequant on the device of q.packed (CUDA, or CPU under TRITON_INTERPRET=1); equals dequantize_nf4."""
    dtype = dtype or q.dtype
    n = q.numel()
    device = q.packed.device
    out = torch.empty(n, dtype=dtype, device=device)
    code = q.code.to(device)
    if q.double_quant:
        dyn, c1, offset = DYNAMIC_CODE.to(device), q.absmax_scale, q.absmax_offset.reshape(1)
    else:  # unused pointers: pass any fp32 tensor
        dyn = c1 = offset = code
    grid = (triton.cdiv(q.packed.numel(), TILE),)
    _dequant_4bit_kernel[grid](q.packed, code, q.absmax, dyn, c1, offset, out, n,
                               BLOCK_SIZE=q.block_size, BLOCK_SIZE2=q.block_size2, DOUBLE_QUANT=q.double_quant,
                               OUT_BF16=dtype == torch.bfloat16, TILE=TILE, enable_fp_fusion=False)  # mul then add, as the reference rounds
    return out.reshape(q.shape)
