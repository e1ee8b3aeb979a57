"""NF4 weights with double quantization: the frozen base of QLoRA, in readable PyTorch.

Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv 2305.14314.

Forward (eq. 5), bf16 activations X:
    Y = X · doubleDequant(c1, c2, W_NF4) + X · L1 · L2
    doubleDequant(c1, c2, W) = dequant(dequant(c1, c2), W)
This file is the first term's weight: W_NF4 and its two levels of quantization constants.
Trained: nothing here (the LoRA factors L1, L2 live elsewhere).  Frozen: every tensor below.

Level 1 (paper §3, "4-bit NormalFloat"): flatten W row-major, cut it into blocks of `block_size` = 64 values,
divide each block by its absmax c2 (fp32), store for each value the index of the nearest of 16 NF4 codes.
Level 2 ("Double Quantization"): the fp32 absmax values minus their mean are themselves quantized, 8 bits
each, in blocks of `block_size2` = 256, with bitsandbytes' signed dynamic 8-bit map; c1 is fp32 per 256 block.

What is stored (n = W.numel(), nb = ceil(n / block_size)), exactly as bitsandbytes 0.50 `quantize_4bit`:
    packed         uint8 (ceil(n/2),)   two 4-bit code indices a byte, element 2k in the HIGH nibble
    absmax         fp32  (nb,)          c2, without double quant
                   uint8 (nb,)          with double quant: index into DYNAMIC_CODE of (c2 − offset) / c1
    absmax_scale   fp32  (ceil(nb/256),) c1 = max |c2 − offset| over each 256 block (double quant only)
    absmax_offset  fp32  ()             offset = mean(c2)                          (double quant only)
The last block may be partial (n need not be a multiple of 64); bitsandbytes allows it and so do we.
Dequantize:  w ≈ code[q] · s_b,   s_b = c2_b   or   (DYNAMIC_CODE[absmax_b] · c1[b // 256]) + offset,
every product and sum rounded to fp32 in that order, then one rounding to the output dtype.
Bits per parameter: 4 + 32/64 = 4.5 without double quant, 4 + 8/64 + 32/(64·256) ≈ 4.127 with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Optional

import torch

BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the sizes bitsandbytes accepts
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Codebooks: 16 values in [-1, 1] for 4 bits, 256 for the 8-bit absmax map

def normal_float_code(offset: float = 0.9677083) -> torch.Tensor:
    """NF4 from normal quantiles (paper §3): 8 positive, 7 negative, one exact zero, scaled to [-1, 1].

    offset = 1 − (1/30 + 1/32)/2 ≈ 0.9677083 (the paper's δ): the outermost quantile is taken halfway
    between the 15- and 16-level choices so that ±1 exist without the infinite quantile Φ⁻¹(1).
    Quantile points are fp32 (as bitsandbytes' `create_normal_map`), Φ⁻¹ is evaluated in float64.
    """
    inv_cdf = NormalDist(0.0, 1.0).inv_cdf
    pos = torch.linspace(offset, 0.5, 9)[:-1]  # 8 probabilities offset … >0.5 → 8 positive values
    neg = torch.linspace(offset, 0.5, 8)[:-1]  # 7 probabilities → 7 negative values
    values = [inv_cdf(p) for p in pos.tolist()] + [0.0] + [-inv_cdf(p) for p in neg.tolist()]
    code = torch.tensor(values, dtype=torch.float32).sort().values
    return code / code.max()  # fp32 divide by Φ⁻¹(offset), so the ends are exactly ±1


# The table bitsandbytes ships (functional.get_4bit_type("nf4")). normal_float_code() reproduces it bit
# for bit (tests/test_nf4.py::test_derived_nf4_code_equals_bitsandbytes); we keep the literal table so the
# stored format never depends on the platform's inverse-CDF, sorted so that index == rank.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def fp4_code() -> torch.Tensor:
    """FP4 E2M1 as bitsandbytes defines it, indexed by bit pattern s e1 e0 m (not sorted).

    For e > 0 the magnitude is 2^(4 − e)·(1 + m/2) (e = 1 → 8, 12; e = 2 → 4, 6; e = 3 → 2, 3); e = 0 is
    the subnormal row m·0.0625. Divided by the largest, 12. Sign bit set → negative, so code 8 is −0.0.
    """
    mags = []
    for bits in range(8):
        e, m = bits >> 1, bits & 1
        mags.append(2.0 ** (4 - e) * (1 + m / 2) if e > 0 else m * 0.0625)
    code = torch.tensor(mags + [-v for v in mags], dtype=torch.float32)
    return code / 12.0


FP4_CODE = fp4_code()
# Symmetric absmax INT4 (paper Table 2's "Int4"), bitsandbytes' get_4bit_type("int4") sorted: k/7, k = −7 … 7,
# with both −0 and +0 so that there are 16 entries.
INT4_CODE = torch.tensor([k / 7 for k in range(-7, 0)] + [-0.0, 0.0] + [k / 7 for k in range(1, 8)])
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE, "int4": INT4_CODE}


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)), 256 sorted values.

    A sign bit, then a run of zeros whose length is a decimal exponent 10^(i − 6), i = 0 … 6, then the
    remaining 6 − i bits are a linear fraction: 2^i evenly spaced midpoints of [0.1, 1]. Plus 0 and 1.
    Small magnitudes get exponent range, large ones get fraction bits — a good fit for centred absmax.
    """
    values = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)  # fp32, as bitsandbytes
        mids = (edges[:-1] + edges[1:]) / 2  # 2^i fraction levels
        values += ((10 ** (i - 6)) * mids).tolist() + (-(10 ** (i - 6)) * mids).tolist()
    values += [0.0, 1.0]  # 254 + 2 = 256 codes
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()


# ----------------------------------------------------------------------------------------------------
# Level 1: blockwise absmax + nearest code (bitsandbytes' quantize_4bit, identical bits)

def quantize_blockwise(w: torch.Tensor, code: torch.Tensor, block_size: int = 64):
    """Flatten w, scale each block by 1/absmax, pick the nearest code. Returns (index uint8 (n,), absmax fp32 (nb,)).

    Ties go to the lower code (torch.bucketize against midpoints, as bitsandbytes). The last block may
    be shorter; bitsandbytes divides it by its absmax (full blocks multiply by the reciprocal, which can
    differ by one ulp) and stores that absmax clamped to 1e-38 — both kept so that the bits agree.
    """
    x = w.reshape(-1).float()  # (n,) fp32: absmax and scaling in fp32 whatever the weight dtype
    n = x.numel()
    full = n - n % block_size
    blocks = x[:full].view(-1, block_size)  # (nb_full, block_size)
    absmax = blocks.abs().amax(dim=1)  # c2 per block
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)  # all-zero block → 0
    if full < n:
        tail_absmax = x[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, (x[full:] / tail_absmax).clamp(-1, 1)])
    return nearest_code(scaled, code), absmax


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index (uint8) of the code nearest each value; an exact midpoint goes to the lower code."""
    order = torch.argsort(code.float().cpu(), stable=True).to(scaled.device)  # FP4 is stored by bit pattern
    sorted_code = code.float().to(scaled.device)[order]
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    rank = torch.bucketize(scaled, midpoints)  # rank = #midpoints < scaled
    return order[rank].to(torch.uint8)


def pack_nibbles(index: torch.Tensor) -> torch.Tensor:
    """(n,) 4-bit indices → (ceil(n/2),) bytes; element 2k in the high nibble. Odd n: a pad of code(0.0)."""
    if index.numel() % 2:
        raise ValueError("pack_nibbles needs an even count; pad with the index of 0.0 first")
    return (index[0::2] << 4) | index[1::2]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """(ceil(n/2),) bytes → (n,) int64 indices, high nibble first."""
    pairs = torch.stack([packed >> 4, packed & 0xF], dim=1)  # (n_bytes, 2)
    return pairs.reshape(-1)[:n].long()


# ----------------------------------------------------------------------------------------------------
# Level 2: 8-bit absmax (bitsandbytes' CPU quantize_blockwise, identical bits)

def quantize_absmax_8bit(x: torch.Tensor, code: torch.Tensor = DYNAMIC_CODE, block_size: int = 256):
    """(m,) fp32 → (index uint8 (m,), scale fp32 (ceil(m/block_size),)), nearest code via a 65536-bin table.

    bitsandbytes' CPU kernel does not search the 256 codes per value: it maps v = x/scale ∈ [-1, 1] to a
    bin t = ⌊((v + 1)·0.5·65535) + 0.5⌋ and reads the code nearest to the bin's centre −1 + 2t/65535 from a
    precomputed table. Near zero the table is coarser than the codes; we copy it to keep identical bits.
    (All fp32 t ∈ [0, 1] were checked: fusing the last multiply-add into an FMA never changes the bin.)
    """
    m = x.numel()
    nb2 = -(-m // block_size)
    padded = torch.nn.functional.pad(x.float(), (0, nb2 * block_size - m)).view(nb2, block_size)
    scale = padded.abs().amax(dim=1)  # c1 per block of 256 absmax values; zero padding changes no max
    v = (padded * (1.0 / scale)[:, None]).clamp(-1, 1)  # fp32 reciprocal then multiply, like the C code
    bins = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)  # truncation = floor, values are ≥ 0.5
    centres = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=x.device)) / 65535
    midpoints = 0.5 * (code[:-1] + code[1:]).to(x.device)
    table = torch.bucketize(centres, midpoints)  # (65536,) code index per bin; ties → lower
    index = torch.where(scale[:, None] > 0, table[bins.clamp(0, 65535)], 0)  # all-zero block → code 0
    return index.reshape(-1)[:m].to(torch.uint8), scale


# ----------------------------------------------------------------------------------------------------
# The stored weight

@dataclass
class NF4Weight:
    packed: torch.Tensor  # uint8 (ceil(n/2),): two code indices a byte, first element high
    absmax: torch.Tensor  # fp32 (nb,) c2, or uint8 (nb,) DYNAMIC_CODE indices with double quant
    absmax_scale: Optional[torch.Tensor]  # fp32 (ceil(nb/block_size2),) c1, or None without double quant
    absmax_offset: Optional[torch.Tensor]  # fp32 () mean of c2, or None without double quant
    shape: tuple  # the original weight's shape, e.g. (d_out, d_in)
    dtype: torch.dtype  # the original weight's dtype, the default for dequantize()
    block_size: int = 64
    block_size2: int = 256
    quant_type: str = "nf4"  # which of CODES the 4-bit indices point into

    @property
    def double_quant(self) -> bool:
        return self.absmax_scale is not None

    @property
    def code(self) -> torch.Tensor:
        return CODES[self.quant_type].to(self.packed.device)

    def numel(self) -> int:
        return math.prod(self.shape)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    def state_dict(self) -> dict:
        """Tensors plus string metadata — the split safetensors wants (tensors, metadata: dict[str, str])."""
        sd = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            sd.update(absmax_scale=self.absmax_scale, absmax_offset=self.absmax_offset)
        sd.update(shape=",".join(map(str, self.shape)), dtype=str(self.dtype).removeprefix("torch."),
                  block_size=str(self.block_size), block_size2=str(self.block_size2), quant_type=self.quant_type)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict) -> "NF4Weight":
        dtype = getattr(torch, sd["dtype"])
        if dtype not in FLOAT_DTYPES or sd["quant_type"] not in CODES:
            raise ValueError(f"not an NF4Weight state dict: dtype {sd['dtype']!r}, quant_type {sd['quant_type']!r}")
        return cls(packed=sd["packed"], absmax=sd["absmax"], absmax_scale=sd.get("absmax_scale"),
                   absmax_offset=sd.get("absmax_offset"), shape=tuple(int(s) for s in sd["shape"].split(",") if s),
                   dtype=dtype, block_size=int(sd["block_size"]), block_size2=int(sd["block_size2"]),
                   quant_type=sd["quant_type"])


def _check_weight(weight: torch.Tensor, block_size: int, block_size2: int, quant_type: str) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor weight, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight dtype {weight.dtype} is not supported; convert it with .float() (or .bfloat16()) "
                        "— NF4 quantizes float32, float16 and bfloat16 weights")
    if weight.numel() == 0:
        raise ValueError(f"weight of shape {tuple(weight.shape)} is empty; there is nothing to quantize")
    if block_size not in BLOCK_SIZES or block_size2 not in BLOCK_SIZES:
        raise ValueError(f"block_size {block_size} / block_size2 {block_size2}: each must be one of {BLOCK_SIZES} "
                         "(64 and 256 are the paper's)")
    if quant_type not in CODES:
        raise ValueError(f"quant_type {quant_type!r} is unknown; pick one of {sorted(CODES)}")
    bad = None if weight.is_meta else ~torch.isfinite(weight)  # a meta weight has a shape, no values to check
    if bad is not None and bad.any():
        flat = int(bad.reshape(-1).nonzero()[0, 0])
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), weight.shape))
        kind = "NaN" if weight.reshape(-1)[flat].isnan() else "Inf"
        raise ValueError(f"weight has {kind} at index {where}; fix the weight before quantizing")


def absmax_mean(absmax: torch.Tensor) -> torch.Tensor:
    """Double quant's offset, the mean of the absmax c2. Summed on the CPU so that a CUDA weight gets the same bits
    as a CPU one (the reduction order differs by device); every other step is exact or IEEE. A meta tensor (a model
    built for its shapes) stays on meta."""
    return absmax.mean() if absmax.is_meta else absmax.cpu().mean().to(absmax.device)


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", block_size: int = 64,
                  double_quant: bool = True, block_size2: int = 256) -> NF4Weight:
    """Quantize any float weight to a 4-bit codebook (NF4, FP4 or INT4), optionally with double quant."""
    _check_weight(weight, block_size, block_size2, quant_type)
    index, absmax = quantize_blockwise(weight, CODES[quant_type], block_size)  # (n,), (nb,) c2
    if index.numel() % 2:  # bitsandbytes pads an odd count with the code nearest 0.0
        index = torch.cat([index, nearest_code(index.new_zeros(1, dtype=torch.float32), CODES[quant_type])])
    q = NF4Weight(packed=pack_nibbles(index), absmax=absmax, absmax_scale=None, absmax_offset=None,
                  shape=tuple(weight.shape), dtype=weight.dtype, block_size=block_size,
                  block_size2=block_size2, quant_type=quant_type)
    if double_quant:
        offset = absmax_mean(absmax)  # paper: subtract the mean (all absmax values are positive)
        q.absmax, q.absmax_scale = quantize_absmax_8bit(absmax - offset, DYNAMIC_CODE, block_size2)
        q.absmax_offset = offset
    return q


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, double_quant: bool = True) -> NF4Weight:
    """QLoRA's storage format: NF4 in blocks of 64, double-quantized absmax in blocks of 256."""
    return quantize_4bit(weight, "nf4", block_size, double_quant)


# ----------------------------------------------------------------------------------------------------
# Dequantization: the reference the Triton kernel equals bit for bit

def block_scales(q: NF4Weight) -> torch.Tensor:
    """Level-2 dequant: the fp32 scale s_b of every level-1 block, (nb,)."""
    if not q.double_quant:
        return q.absmax.float()
    c1 = q.absmax_scale.repeat_interleave(q.block_size2)[: q.absmax.numel()]  # (nb,) c1 of each block
    dyn = DYNAMIC_CODE.to(q.absmax.device)[q.absmax.long()] * c1  # fp32 product, rounded …
    return dyn + q.absmax_offset  # … then the fp32 sum: never fused, so every backend agrees


def dequantize_nf4(q: NF4Weight, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """W ≈ doubleDequant(c1, c2, W_NF4) (eq. 5) in `dtype` (default: the original), computed in fp32."""
    n = q.numel()
    values = q.code[unpack_nibbles(q.packed, n)]  # (n,) fp32 code values
    scales = block_scales(q).repeat_interleave(q.block_size)[:n]  # (n,) s_b per element
    return (values * scales).to(dtype or q.dtype).reshape(q.shape)  # one rounding to bf16/fp16 (RNE)


def bits_per_param(block_size: int = 64, double_quant: bool = True, block_size2: int = 256) -> float:
    """Storage per weight: 4 bits + the absmax constants (paper §3: 0.5 → 0.127 bits with double quant)."""
    if not double_quant:
        return 4 + 32 / block_size  # fp32 c2 per block
    return 4 + 8 / block_size + 32 / (block_size * block_size2)  # uint8 c2 per block, fp32 c1 per 256 blocks
