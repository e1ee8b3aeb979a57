"""minilora.nf4: codebooks, layout, errors, error bounds, and bit-for-bit parity with bitsandbytes 0.50 on CPU.

Parity tests skip (with the reason) when bitsandbytes is not importable. bitsandbytes' CPU path: quantize_4bit is
its PyTorch "default" op (bucketize against midpoints); the nested absmax goes through its C quantize_blockwise
(65536-bin table); dequantize_4bit is C (fp32 products, round-to-nearest-even to fp16/bf16), or its PyTorch op
(torch.compile'd) when the last dim is odd — we force that one eager here to keep the tests fast.
"""
import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minilora import nf4
from minilora.nf4 import (DYNAMIC_CODE, FP4_CODE, INT4_CODE, NF4_CODE, NF4Weight, bits_per_param, block_scales,
                          dequantize_nf4, quantize_4bit, quantize_absmax_8bit, quantize_blockwise, quantize_nf4)

BNB_ERROR = None
try:
    import bitsandbytes.functional as bnbF
except Exception as e:  # not installed, or its native library fails to load here
    bnbF, BNB_ERROR = None, repr(e)
needs_bnb = pytest.mark.skipif(bnbF is None, reason=f"bitsandbytes (the parity reference) is not importable: {BNB_ERROR}")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def eager():  # bitsandbytes' odd-shape dequant is torch.compile'd; same math eager, without the compile time
    if hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()


def bnb_quantize(w, quant_type="nf4", double_quant=True):
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    with eager():
        out = bnbF.dequantize_4bit(packed, state)
    return packed, state, out.reshape(w.shape)  # 1-D weights come back as (1, n)


def weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[::37] *= 40  # outliers, so blocks differ in absmax
    return w.to(dtype)


# ---------------------------------------------------------------------------------------------- codebooks

def test_nf4_code_shape():
    code = nf4.normal_float_code()
    assert code.numel() == 16 and torch.all(code[1:] > code[:-1])
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and (code == 0).sum() == 1  # asymmetric halves
    assert code[0] == -1 and code[-1] == 1


def test_derived_nf4_code_equals_bitsandbytes():
    # bit for bit: fp32 quantile points, float64 Φ⁻¹ (statistics.NormalDist vs scipy's ndtri), fp32 normalization
    assert torch.equal(bits(nf4.normal_float_code()), bits(NF4_CODE))
    if bnbF is not None:
        assert torch.equal(bits(bnbF.get_4bit_type("nf4", device="cpu")), bits(NF4_CODE))


def test_dynamic_code_equals_bitsandbytes():
    assert DYNAMIC_CODE.numel() == 256 and torch.all(DYNAMIC_CODE[1:] >= DYNAMIC_CODE[:-1])
    assert DYNAMIC_CODE[-1] == 1 and (DYNAMIC_CODE == 0).any()
    if bnbF is not None:
        assert torch.equal(bits(bnbF.create_dynamic_map(signed=True)), bits(DYNAMIC_CODE))


def test_fp4_and_int4_codes():
    assert FP4_CODE.abs().max() == 1 and FP4_CODE[3] == 1 and FP4_CODE[11] == -1
    assert str(FP4_CODE[8].item()) == "-0.0"  # bit pattern 1000 = −0, as bitsandbytes' C dequant table
    assert torch.equal(INT4_CODE, -INT4_CODE.flip(0)) and INT4_CODE.numel() == 16
    if bnbF is not None:  # same values (its Python table writes −0 as the integer 0, i.e. +0.0)
        assert torch.equal(bnbF.get_4bit_type("fp4", device="cpu"), FP4_CODE)


# ---------------------------------------------------------------------------------------------- layout

def test_first_element_in_high_nibble():
    w = torch.zeros(64)
    w[0], w[1] = -1.0, 1.0  # codes 0 (−1.0) and 15 (+1.0)
    q = quantize_nf4(w, double_quant=False)
    assert q.packed[0].item() == 0x0F and q.packed[1].item() == 0x77  # (0 << 4) | 15; zeros are code 7
    assert torch.equal(q.absmax, torch.tensor([1.0]))


def test_partial_last_block_and_odd_count():
    w = torch.randn(5, 7)  # 35 values: one partial block of 35, an odd number of nibbles
    q = quantize_nf4(w)
    assert q.packed.numel() == 18 and q.absmax.numel() == 1 and q.absmax_scale.numel() == 1
    assert q.packed[-1].item() & 0xF == 7  # the pad nibble is the code of 0.0
    assert dequantize_nf4(q).shape == (5, 7)


def test_all_zero_blocks_store_absmax_like_bitsandbytes():
    w = torch.zeros(64 + 10)
    q = quantize_nf4(w, double_quant=False)
    assert q.absmax[0] == 0 and q.absmax[1] == torch.tensor(1e-38)  # a partial block's absmax is clamped (bnb)
    assert torch.equal(dequantize_nf4(q), w)


def test_signed_zeros_dequantize_to_zero():
    w = torch.tensor([0.0, -0.0] * 32)
    assert torch.equal(quantize_nf4(w).dequantize(), torch.zeros(64))


# ---------------------------------------------------------------------------------------------- API

def test_dequantize_dtype_default_and_override():
    w = torch.randn(4, 64, dtype=torch.bfloat16)
    q = quantize_nf4(w)
    assert q.dequantize().dtype == torch.bfloat16 and q.dequantize().shape == (4, 64)
    assert q.dequantize(torch.float32).dtype == torch.float32
    assert torch.equal(q.dequantize(torch.float32).bfloat16(), q.dequantize())  # one rounding from fp32


def test_bits_per_param():
    assert bits_per_param(64, double_quant=False) == 4.5
    assert bits_per_param(64, double_quant=True, block_size2=256) == pytest.approx(4.127, abs=5e-4)
    q = quantize_nf4(torch.randn(256, 4096))  # the stored tensors agree (plus one fp32 offset)
    stored = sum(t.numel() * t.element_size() for t in (q.packed, q.absmax, q.absmax_scale, q.absmax_offset))
    assert stored * 8 / q.numel() == pytest.approx(bits_per_param(), abs=1e-4)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant, tmp_path):
    q = quantize_nf4(torch.randn(3, 50, dtype=torch.float16), double_quant=double_quant)
    sd = q.state_dict()
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    meta = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    assert all(isinstance(v, str) for v in meta.values())  # safetensors metadata is dict[str, str]
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(tensors, tmp_path / "w.safetensors", metadata=meta)
    with safetensors.safe_open(tmp_path / "w.safetensors", "pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()} | f.metadata()
    q2 = NF4Weight.from_state_dict(loaded)
    assert q2.shape == (3, 50) and q2.dtype == torch.float16 and q2.double_quant == double_quant
    assert torch.equal(bits(q2.dequantize()), bits(q.dequantize()))


# ---------------------------------------------------------------------------------------------- errors

def test_nan_names_index_and_fix():
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"weight has NaN at index \(2, 5\); fix the weight before quantizing"):
        quantize_nf4(w)


def test_inf_is_rejected():
    w = torch.randn(64)
    w[7] = -float("inf")
    with pytest.raises(ValueError, match=r"weight has Inf at index \(7,\)"):
        quantize_nf4(w)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.float64, torch.bool])
def test_non_float_dtype_is_rejected(dtype):
    with pytest.raises(TypeError, match=r"not supported; convert it with \.float\(\)"):
        quantize_nf4(torch.zeros(64, dtype=dtype))


@pytest.mark.parametrize("block_size", [0, 16, 63, 100, 8192])
def test_bad_block_size_is_rejected(block_size):
    with pytest.raises(ValueError, match="must be one of"):
        quantize_nf4(torch.randn(64), block_size=block_size)


def test_empty_weight_is_rejected():
    with pytest.raises(ValueError, match="is empty"):
        quantize_nf4(torch.zeros(0, 64))


# ---------------------------------------------------------------------------------------------- parity

SHAPES = [(4, 64), (3, 50), (5, 7), (130, 130), (1000,)]  # 150 and 35 are multiples of neither 64 nor 256;
#                                                           16900 → 265 blocks → two 256-blocks of absmax


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_nf4_equals_bitsandbytes(shape, dtype, double_quant, seed):
    w = weight(shape, dtype, seed)
    packed, state, out = bnb_quantize(w, "nf4", double_quant)
    q = quantize_nf4(w, double_quant=double_quant)
    assert torch.equal(q.packed, packed.reshape(-1))  # bnb stores (ceil(n/2), 1)
    assert torch.equal(bits(q.absmax), bits(state.absmax))  # uint8 codes with DQ, fp32 without
    if double_quant:
        assert torch.equal(bits(q.absmax_scale), bits(state.state2.absmax))
        assert torch.equal(bits(q.absmax_offset), bits(state.offset))
        assert state.state2.blocksize == q.block_size2 and torch.equal(bits(state.state2.code), bits(DYNAMIC_CODE))
    assert torch.equal(bits(q.dequantize()), bits(out))


@needs_bnb
@pytest.mark.parametrize("shape", [(4, 64), (3, 50), (5, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_quantize_fp4_equals_bitsandbytes(shape, dtype):
    w = weight(shape, dtype, 3)
    packed, state, out = bnb_quantize(w, "fp4", True)
    q = quantize_4bit(w, "fp4")
    assert torch.equal(q.packed, packed.reshape(-1)) and torch.equal(q.absmax, state.absmax)
    # FP4's code 8 is −0.0; bitsandbytes reads it as +0.0 or −0.0 depending on which of its CPU paths runs (its
    # PyTorch fallback, its C kernels, their AVX512 variants: it differs by shape and by CPU). Values equal everywhere
    # (−0.0 == +0.0); the bits equal wherever the value is not zero.
    ours = q.dequantize()
    assert torch.equal(ours, out)
    assert torch.equal(bits(ours[out != 0]), bits(out[out != 0]))


@needs_bnb
def test_nested_8bit_quantization_equals_bitsandbytes_quantize_blockwise():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(600, generator=g), torch.zeros(256), torch.rand(100, generator=g) * 1e-6,
                   (DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) / 2])  # a zero block, tiny values, exact midpoints
    codes, scale = quantize_absmax_8bit(x, DYNAMIC_CODE, 256)
    ref_codes, ref_state = bnbF.quantize_blockwise(x, code=bnbF.create_dynamic_map(), blocksize=256)
    assert torch.equal(codes, ref_codes) and torch.equal(bits(scale), bits(ref_state.absmax))


@needs_bnb
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_equals_bitsandbytes_on_arbitrary_weights(data):
    w = data.draw(adversarial_weights())
    dtype = data.draw(st.sampled_from(DTYPES))
    w = w.to(dtype)
    if not torch.isfinite(w).all():  # a float32 value too large for fp16
        return
    double_quant = data.draw(st.booleans())
    packed, state, out = bnb_quantize(w, "nf4", double_quant)
    q = quantize_nf4(w, double_quant=double_quant)
    assert torch.equal(q.packed, packed.reshape(-1)) and torch.equal(bits(q.absmax), bits(state.absmax))
    assert torch.equal(bits(q.dequantize()), bits(out))


# ---------------------------------------------------------------------------------------------- error bounds

@st.composite
def adversarial_weights(draw):
    """Random float32 weights, plus the cases that break scaling: zero blocks, one huge outlier, ±0, subnormals."""
    n = draw(st.integers(1, 400))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e4]))
    w = torch.from_numpy(draw(hnp.arrays(np.float32, n, elements=st.floats(-1, 1, width=32)))) * scale
    kind = draw(st.sampled_from(["plain", "zero_block", "outlier", "signed_zeros", "subnormal", "constant"]))
    if kind == "zero_block" and n > 64:
        w[64:128] = 0.0
    elif kind == "outlier":
        w[draw(st.integers(0, n - 1))] = draw(st.sampled_from([3e4, -1e30, 1e20]))
    elif kind == "signed_zeros":
        w[::2] = -0.0
        w[1::2] = 0.0
    elif kind == "subnormal":
        w = w * 1e-39  # fp32 subnormals (and zeros)
    elif kind == "constant":
        w[:] = draw(st.floats(-10, 10, width=32))
    return w


def max_gap(code: torch.Tensor) -> float:
    c = code.sort().values
    return (c[1:] - c[:-1]).max().item()


@settings(max_examples=60, deadline=None)
@given(w=adversarial_weights(), double_quant=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_round_trip_error_bound_per_block(w, double_quant, dtype):
    w = w.to(dtype)
    if not torch.isfinite(w).all():
        return
    q = quantize_nf4(w, double_quant=double_quant)
    deq = q.dequantize(torch.float32)  # compare in fp32; the output rounding is checked separately below
    _, c2 = quantize_blockwise(w, NF4_CODE, 64)  # level-1 absmax per block
    s = block_scales(q)  # what dequantization multiplies by
    n = w.numel()
    per_elem = lambda t: t.repeat_interleave(64)[:n]  # noqa: E731
    c2_e, s_e = per_elem(c2), per_elem(s)
    # |w − code·s| ≤ |w − code·c2| + |c2 − s|  (|code| ≤ 1);  |w − code·c2| ≤ c2·gap/2 (nearest code), or ≤ c2 when
    # c2 < 1e-38: bitsandbytes scales those blocks by 1/1e-38, so they dequantize to ~0
    level1 = torch.where(c2_e < 1e-38, c2_e, c2_e * max_gap(NF4_CODE) / 2)
    bound = level1 + (c2_e - s_e).abs() + 1e-6 * c2_e + 1e-44
    err = (w.float().reshape(-1) - deq.reshape(-1)).abs()
    assert torch.all(err <= bound), (err - bound).max()
    if double_quant:  # |c2 − s| ≤ c1·(gap/2 + half a table bin of 2/65535), plus fp32 rounding
        c1 = q.absmax_scale.repeat_interleave(q.block_size2)[: c2.numel()]
        dq_bound = c1 * (max_gap(DYNAMIC_CODE) / 2 + 1 / 65535) + 1e-6 * (c1 + q.absmax_offset.abs())
        assert torch.all((c2 - s).abs() <= dq_bound)
    else:
        assert torch.equal(s, c2)
    out = q.dequantize()  # output dtype: exactly the fp32 result rounded once
    assert torch.equal(bits(out), bits(deq.to(q.dtype).reshape(out.shape)))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_codebooks_round_trip_in_their_own_gap(quant_type):
    w = torch.randn(32, 64)
    q = quantize_4bit(w, quant_type, double_quant=False)
    err = (w - q.dequantize()).abs()
    assert torch.all(err <= q.absmax.repeat_interleave(64).view(32, 64) * max_gap(nf4.CODES[quant_type]) / 2 + 1e-7)


def test_nf4_beats_fp4_and_int4_on_normal_weights():
    # paper Table 2 / Fig. 3: for normally distributed weights NF4 has the lowest error at 4 bits
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    mse = {t: (w - quantize_4bit(w, t, double_quant=False).dequantize()).pow(2).mean().item() for t in nf4.CODES}
    assert mse["nf4"] < mse["fp4"] and mse["nf4"] < mse["int4"]
    assert math.isclose(bits_per_param(double_quant=False), 4.5)


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_exact_midpoints_go_to_the_lower_code_like_bitsandbytes(quant_type):
    code = nf4.CODES[quant_type].sort().values
    mids = (code[:-1] + code[1:]) / 2  # absmax 1.0, so w / absmax is exactly each midpoint
    w = torch.cat([torch.tensor([1.0]), mids, -mids, torch.zeros(64 - 1 - 2 * mids.numel())])
    q = quantize_4bit(w, quant_type, double_quant=False)
    packed, _, _ = bnb_quantize(w, quant_type, False)
    assert torch.equal(q.packed, packed.reshape(-1))
    index = torch.stack([q.packed >> 4, q.packed & 15], 1).reshape(-1).long()
    assert torch.all(nf4.CODES[quant_type][index[1:16]] == code[:-1])  # +midpoint k → code k, the lower one


@needs_bnb
def test_partial_last_block_divides_like_bitsandbytes():
    # full blocks are scaled by w·(1/absmax), the partial last block by w/absmax; these values are one ulp apart
    # under the two and straddle an NF4 midpoint (found by search), so the two roundings pick different codes
    am, xs = 2.8046653270721436, [-0.12768243253231049, 1.4069981575012207]
    w = torch.cat([torch.randn(64), torch.tensor([am] + xs)])  # 67 values: the last block holds 3
    q = quantize_nf4(w, double_quant=False)
    packed, _, _ = bnb_quantize(w, "nf4", False)
    assert torch.equal(q.packed, packed.reshape(-1))
    full = quantize_nf4(torch.tensor([am] + xs + [0.0] * 61), double_quant=False)  # same values, a full block
    assert not torch.equal(full.packed[:2], q.packed[32:34])
