"""Triton BGMV for many LoRA adapters of different ranks in one batch (Punica, Chen et al. 2023, arXiv 2310.18547;
S-LoRA, Sheng et al. 2023, arXiv 2311.03285). Reference: minilora.serve.bgmv_reference, which it equals to fp32
rounding (the sums are taken in another order).

Token n of the batch carries a slot index a_n into a pool of adapters padded to rank R:
    A (S, R, d_in)   B (S, d_out, R)   scaling (S,)   rank (S,)   with A[s, r:] = 0, B[s, :, r:] = 0 past rank[s]
    y_n = scaling[a_n] · B[a_n] (A[a_n] x_n)              x_n (d_in,)  ->  y_n (d_out,)
Two kernels, as Punica's BGMV: shrink h_n = A[a_n] x_n (R,), then expand y_n = scaling[a_n] · B[a_n] h_n (d_out,).
Heterogeneous ranks: every load is masked by r < rank[a_n], so an adapter of rank 4 in a pool padded to 64 reads
4 rows of A and 4 columns of B, not 64 (masked-out lanes move no memory on a GPU). A slot of rank 0 (the pool's
"no adapter" slot) gives y_n = 0.
Accumulation in fp32; y is written in x's dtype. One program per token (shrink) or per (token, BLOCK_N outputs)
(expand): every token reads its own adapter, which is the decode case (one token per request) Punica's BGMV is for.
"""
import torch

import triton
import triton.language as tl


@triton.jit
def _bgmv_shrink_kernel(x_ptr, a_ptr, slot_ptr, rank_ptr, h_ptr, d_in,
                        sx_n, sa_s, sa_r, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    rank = tl.load(rank_ptr + slot)
    r = tl.arange(0, BLOCK_R)  # (BLOCK_R,) rank rows; only r < rank[slot] are read
    r_mask = r < rank
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,) input features
        k_mask = k < d_in
        x = tl.load(x_ptr + n * sx_n + k, mask=k_mask, other=0.0).to(tl.float32)  # (BLOCK_K,)
        a = tl.load(a_ptr + slot * sa_s + r[:, None] * sa_r + k[None, :],  # (BLOCK_R, BLOCK_K) of A[slot]
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)  # (BLOCK_R, BLOCK_K) · (BLOCK_K,) -> (BLOCK_R,)
    tl.store(h_ptr + n * R + r, acc, mask=r < R)


@triton.jit
def _bgmv_expand_kernel(h_ptr, b_ptr, slot_ptr, rank_ptr, scaling_ptr, y_ptr, d_out,
                        sb_s, sb_o, sy_n, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output features
    o_mask = o < d_out
    slot = tl.load(slot_ptr + n).to(tl.int64)
    rank = tl.load(rank_ptr + slot)
    s = tl.load(scaling_ptr + slot).to(tl.float32)
    r = tl.arange(0, BLOCK_R)
    r_mask = r < rank
    h = tl.load(h_ptr + n * R + r, mask=r_mask, other=0.0)  # (BLOCK_R,) fp32
    b = tl.load(b_ptr + slot * sb_s + o[:, None] * sb_o + r[None, :],  # (BLOCK_N, BLOCK_R) of B[slot]
                mask=o_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    y = tl.sum(b * h[None, :], axis=1) * s  # (BLOCK_N, BLOCK_R) · (BLOCK_R,) -> (BLOCK_N,)
    tl.store(y_ptr + n * sy_n + o, y.to(y_ptr.dtype.element_ty), mask=o_mask)


def bgmv_triton(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor, rank: torch.Tensor,
                slots: torch.Tensor, block_k: int = 128, block_n: int = 128) -> torch.Tensor:
    """y (N, d_out) with y_n = scaling[slots[n]] · B[slots[n]] (A[slots[n]] x_n), for x (N, d_in), A (S, R, d_in),
    B (S, d_out, R), scaling (S,), rank (S,) int32, slots (N,) int64 in [0, S). CUDA, or CPU under TRITON_INTERPRET=1."""
    N, d_in = x.shape
    S, R, _ = A.shape
    d_out = B.size(1)
    x, A, B = x.contiguous(), A.contiguous(), B.contiguous()
    h = torch.empty(N, R, dtype=torch.float32, device=x.device)  # (N, R): A[a_n] x_n
    y = torch.empty(N, d_out, dtype=x.dtype, device=x.device)
    if N == 0:
        return y
    block_r = triton.next_power_of_2(R)
    block_k = min(block_k, triton.next_power_of_2(d_in))
    block_n = min(block_n, triton.next_power_of_2(d_out))
    _bgmv_shrink_kernel[(N,)](x, A, slots, rank, h, d_in, x.stride(0), A.stride(0), A.stride(1),
                              R=R, BLOCK_R=block_r, BLOCK_K=block_k)
    _bgmv_expand_kernel[(N, triton.cdiv(d_out, block_n))](h, B, slots, rank, scaling, y, d_out,
                                                          B.stride(0), B.stride(1), y.stride(0),
                                                          R=R, BLOCK_R=block_r, BLOCK_N=block_n)
    return y
