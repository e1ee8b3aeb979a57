"""LoftQ: LoRA-Fine-Tuning-aware Quantization (Li, Yu, Liang, He, Karampatziakis, Chen, Zhao 2023, arXiv 2310.08659).

    min over Q, A, B of ‖W − Q − s·B A‖_F       Q in the N-bit set (NF4, NF2 or INT2), W (d_out, d_in)

Alg. 1, alternating, in minilora's (d_out, d_in) orientation (the paper writes W ≈ Q + A Bᵀ with its own A, B):
    B_0 A_0 = 0
    for t = 1 … T:   Q_t = q_N(W − B_{t−1} A_{t−1})                 quantize what the low-rank part leaves
                     B_t A_t = top-r SVD of W − Q_t, √σ on each side  the best rank-r fit of the rest
T = 1 is QLoRA's Q = q_N(W) plus a rank-r SVD of its residual. Then LoRA trains on the frozen Q_T:
    h = Q_T x + s · B A x        s = alpha/r (LoRA's scaling), B, A from Alg. 1 divided by √s each, so s·BA = B_T A_T

Trained: lora_A, lora_B of every adapted linear (QLoRA's targets, all linears).
Frozen: Q_T, stored as codes + absmax in qlora's Linear4bit format (LoftQLinear4bit), biases, the rest of the GPT.
Init: the point of the method. QLoRA starts from Q = q_N(W) with B = 0, so its model is off by W − Q everywhere;
    LoftQ starts from Q_T + B_T A_T, closer to W (‖W − Q_T − B_T A_T‖ < ‖W − q_N(W)‖).
    Neither is the original model: identity_at_init is False, as for QLoRA.
Scaling: PEFT's loftq_init sets lora_B = B_T, lora_A = A_T and ignores s (PEFT issue #1982), which is right only for
    alpha = r. Here both are divided by √s, so the model at init is Q_T + B_T A_T for every alpha (equal to PEFT's
    at alpha = r: tests/test_loftq.py::test_equals_peft_loftq_init).
Codes: "nf4" is nf4.NF4_CODE (bitsandbytes' bits); "nf2" is the same normal-quantile construction with 4 levels
    (normal_float_code; nf4.normal_float_code is written for 16 levels only); "int2" is uniform, 4 levels in
    [−1, 1]. The paper uses NF2 and uniform INT2 at 2 bits. 2-bit codes are stored one per 4-bit nibble:
    the numbers are 2-bit, the memory is 4-bit's (nf4.NF4Weight packs nibbles only).
Files: the adapter holds A, B only; load_adapter runs Alg. 1 again on the original base (deterministic: same Q_T,
    same init), then loads the trained A, B.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lora
from .attach import find_targets, register, replace_module
from .kernels import use_triton
from .nf4 import (CODES, DYNAMIC_CODE, NF4_CODE, NF4Weight, _check_weight, absmax_mean, dequantize_nf4, nearest_code,
                  pack_nibbles, quantize_absmax_8bit, quantize_blockwise)
from .qlora import _TENSORS, DTYPES, Linear4bit, QLoRAConfig, QLoRALinear


# ------------------------------------------------------------------------ the N-bit codes
def normal_float_code(bits: int, offset: float = 0.9677083) -> torch.Tensor:
    """NF-k: 2^(k−1) positive normal quantiles, 2^(k−1) − 1 negative ones and an exact 0, scaled to [−1, 1], as
    nf4.normal_float_code (bits=4 gives NF4_CODE bit for bit) and LoftQ's create_normal_map(num_bits=k), which keeps
    QLoRA's offset δ ≈ 0.9677 at every k (so NF2 = {−1, 0, Φ⁻¹(0.7339)/Φ⁻¹(δ), 1} = {−1, 0, 0.338, 1})."""
    half = 2 ** (bits - 1)
    inv_cdf = NormalDist(0.0, 1.0).inv_cdf
    pos = torch.linspace(offset, 0.5, half + 1)[:-1]  # fp32 probabilities, as bitsandbytes and LoftQ
    neg = torch.linspace(offset, 0.5, half)[:-1]
    values = [inv_cdf(p) for p in pos.tolist()] + [0.0] + [-inv_cdf(p) for p in neg.tolist()]
    code = torch.tensor(values, dtype=torch.float32).sort().values
    return code / code.max()


# "int2": LoftQ's create_uniform_map(num_bits=2), 4 evenly spaced levels, no zero. Blocks are scaled by their absmax,
# as for NF; LoftQ's NFQuantizer scales "uniform" blocks by mean + 2.5·std instead (so its INT2 bits differ).
LOFTQ_CODES = {"nf4": NF4_CODE, "nf2": normal_float_code(2), "int2": torch.linspace(-1, 1, 4)}
BITS = {"nf4": 4, "nf2": 2, "int2": 2}


@dataclass
class LoftQWeight(NF4Weight):
    """nf4.NF4Weight whose indices may point into a 2-bit code: same fields and dequantize, code from LOFTQ_CODES."""

    @property
    def code(self) -> torch.Tensor:
        return LOFTQ_CODES[self.quant_type].to(self.packed.device)


def quantize(weight: torch.Tensor, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False,
             block_size2: int = 256) -> LoftQWeight:
    """q_N of Alg. 1: nf4.quantize_4bit's steps (blockwise absmax, nearest code, optional double quant) with any
    code of LOFTQ_CODES. "nf4" gives nf4.quantize_nf4's (and bitsandbytes') bits exactly."""
    if quant_type not in LOFTQ_CODES:
        raise ValueError(f"quant_type {quant_type!r} is unknown; pick one of {sorted(LOFTQ_CODES)}")
    _check_weight(weight, block_size, block_size2, "nf4")  # dtype, finite values, block sizes
    code = LOFTQ_CODES[quant_type]
    index, absmax = quantize_blockwise(weight, code, block_size)  # (n,) code indices, (nb,) c2
    if index.numel() % 2:  # pad to whole bytes with the code nearest 0.0, as nf4.quantize_4bit
        index = torch.cat([index, nearest_code(index.new_zeros(1, dtype=torch.float32), code)])
    q = LoftQWeight(pack_nibbles(index), absmax, None, None, tuple(weight.shape), weight.dtype, block_size,
                    block_size2, quant_type)
    if double_quant:  # QLoRA's second level, as nf4.quantize_4bit
        q.absmax_offset = absmax_mean(absmax)
        q.absmax, q.absmax_scale = quantize_absmax_8bit(absmax - q.absmax_offset, DYNAMIC_CODE, block_size2)
    return q


def _dequantize(q: NF4Weight, dtype=None) -> torch.Tensor:
    """Q as a dense tensor: the Triton kernel for NF4 on CUDA (it reads nf4.CODES by name), else the reference."""
    if q.quant_type in CODES and use_triton(q.packed):
        from .kernels import dequantize
        return dequantize(q, dtype)
    return dequantize_nf4(q, dtype)


# ------------------------------------------------------------------------ Alg. 1
@torch.no_grad()
def loftq_init(weight: torch.Tensor, r: int, quant_type: str = "nf4", num_iter: int = 1, block_size: int = 64,
               double_quant: bool = False):
    """Alg. 1 on one weight W (d_out, d_in). Returns (q, B, A, errors): q the LoftQWeight of Q_T, B (d_out, r) and
    A (r, d_in) with W ≈ Q_T + B A (None when num_iter = 0: QLoRA's init), errors[t] = ‖W − Q_t − B_t A_t‖_F,
    errors[0] = ‖W − q_N(W)‖_F (B_0 A_0 = 0: QLoRA's error). All in fp32."""
    d_out, d_in = weight.shape
    if num_iter < 0 or not 0 < r <= min(d_out, d_in):
        raise ValueError(f"num_iter {num_iter} and r {r} for a ({d_out}, {d_in}) weight: num_iter must be ≥ 0 "
                         f"and r between 1 and {min(d_out, d_in)} (the rank of the residual can be no larger)")
    W = weight.detach().float()
    norm = lambda t: float("nan") if t.is_meta else torch.linalg.norm(t).item()  # noqa: E731 (meta: shapes only)
    q = quantize(W, quant_type, block_size, double_quant)  # Q_1 = q_N(W − 0)
    errors = [norm(W - q.dequantize(torch.float32))]
    B = A = None
    for t in range(1, num_iter + 1):
        if t > 1:
            q = quantize(W - B @ A, quant_type, block_size, double_quant)  # Q_t = q_N(W − B_{t−1} A_{t−1})
        residual = W - q.dequantize(torch.float32)  # W − Q_t (d_out, d_in)
        U, S, Vh = torch.linalg.svd(residual, full_matrices=False)  # U (d_out, k), S (k,), Vh (k, d_in)
        B = U[:, :r] * S[:r].sqrt()  # (d_out, r): U_r √Σ_r
        A = S[:r].sqrt()[:, None] * Vh[:r]  # (r, d_in): √Σ_r V_rᵀ
        errors.append(norm(residual - B @ A))  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
    return q, B, A, errors


# ------------------------------------------------------------------------ the frozen layer and the config
class LoftQLinear4bit(Linear4bit):
    """qlora.Linear4bit built from a given quantized weight (Q_T) instead of quantizing W itself; any LOFTQ_CODES."""

    def __init__(self, q: LoftQWeight, bias: nn.Parameter | None = None, compute_dtype: str = "auto"):
        nn.Module.__init__(self)  # Linear4bit.__init__ would quantize a dense weight; the buffers are the same
        self.out_features, self.in_features = q.shape
        for k in _TENSORS:
            self.register_buffer(k, getattr(q, k))
        self.meta = dataclasses.replace(q, **dict.fromkeys(_TENSORS))  # shape, dtype, block sizes, quant_type
        self.bias = bias
        self.compute_dtype = compute_dtype

    @property
    def weight(self) -> torch.Tensor:
        return _dequantize(self.quant)  # Q_T in W's dtype (a fresh copy)

    def forward(self, x):
        if self.meta.quant_type in CODES or not use_triton(self.packed):
            return super().forward(x)  # QLoRA's path: dequantize in forward and again in backward
        # a 2-bit code where QLoRA's path would take the Triton kernel, which knows nf4.CODES only: dequantize with
        # the reference instead (autograd then keeps the dense Q for backward)
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = (DTYPES[self.compute_dtype] if self.compute_dtype != "auto" else
                 torch.get_autocast_dtype(x.device.type) if autocast else x.dtype)  # as Linear4bit.forward
        with torch.autocast(x.device.type, enabled=False):
            bias = None if self.bias is None else self.bias.to(dtype)
            y = F.linear(x.to(dtype), dequantize_nf4(self.quant, dtype), bias)  # (B, T, d_in) -> (B, T, d_out)
        return y.to(dtype if autocast else x.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", quant_type={self.meta.quant_type}"


@dataclass
class LoftQConfig(QLoRAConfig):
    """QLoRAConfig's fields (r, alpha, targets = all linears, block_size, compute_dtype, ...), plus:"""
    quant_type: str = "nf4"  # q_N: "nf4" (4-bit), "nf2" or "int2" (2-bit); PEFT's loftq_bits is BITS[quant_type]
    loftq_iter: int = 1  # T, alternating steps of Alg. 1 (PEFT's default 1; 0 = QLoRA's init on the same q_N)
    double_quant: bool = False  # PEFT's LoftQ quantizes without it (bitsandbytes compress_statistics=False)

    identity_at_init: ClassVar[bool] = False  # the model starts at Q_T + s·BA ≈ W, not at W (see the docstring)

    def __post_init__(self):
        super().__post_init__()
        if self.quant_type not in LOFTQ_CODES or self.loftq_iter < 0:
            raise ValueError(f"quant_type={self.quant_type!r}, loftq_iter={self.loftq_iter}: quant_type is one of "
                             f"{sorted(LOFTQ_CODES)} and loftq_iter ≥ 0")
        if self.fused_qkv or self.embedding:
            raise ValueError("LoftQ fits one A, B pair to each whole weight matrix: use fused_qkv=None and "
                             "embedding=False (LoRAConfig supports those, on a dense base)")

    def to_json(self) -> dict:
        """QLoRA's PEFT fields, and the LoftQ settings. As PEFT's LoftQ example saves it, init_lora_weights stays
        True: the file holds trained A, B; the base it needs is Q_T (dequantized_base), not W."""
        raw = {**super().to_json(), "minilora_loftq": {"loftq_bits": BITS[self.quant_type],
                                                       "loftq_iter": self.loftq_iter, "quant_type": self.quant_type}}
        if self.quant_type != "nf4":
            raw["minilora_quantization"] = None  # bitsandbytes has no 2-bit type
        return raw


# ------------------------------------------------------------------------ attaching
@register("loftq", LoftQConfig, lr=1e-2,
          description="LoftQ: QLoRA whose A, B start at a rank-r fit of the quantization error (alternating SVD)")
def apply(model, config: LoftQConfig) -> None:
    init = {}  # module name -> (B_T, A_T)
    for name in find_targets(model, config.targets, config.layers):
        linear = model.get_submodule(name)  # nn.Linear W (d_out, d_in): replaced by Q_T, then dropped
        r = config.rank_alpha(name)[0]
        q, B, A, _ = loftq_init(linear.weight, r, config.quant_type, config.loftq_iter, config.block_size,
                                config.double_quant)
        q.dtype = linear.weight.dtype  # Q_T dequantizes to W's dtype
        replace_module(model, name, QLoRALinear(LoftQLinear4bit(q, linear.bias, config.compute_dtype)))
        init[name] = B, A
    lora.apply(model, config)  # A Kaiming, B = 0 on each layer, as QLoRA; then overwritten with Alg. 1's
    name = config.adapter_name
    with torch.no_grad():
        for module, (B, A) in init.items():
            m = model.get_submodule(module)
            if B is not None:  # s·(B/√s)(A/√s) = B_T A_T whatever alpha is
                root = math.sqrt(m.scaling[name])
                m.lora_B[name].weight.copy_(B / root)
                m.lora_A[name].weight.copy_(A / root)


def error_curves(model, config: LoftQConfig, num_iter: int | None = None) -> dict[str, list[float]]:
    """{module: [‖W − q_N(W)‖, ‖W − Q_1 − B_1A_1‖, …, ‖W − Q_T − B_TA_T‖]} for each target of a plain (unattached)
    model: entry 0 is QLoRA's error, entry t LoftQ's after t steps (T = num_iter, default config.loftq_iter)."""
    T = config.loftq_iter if num_iter is None else num_iter
    return {n: loftq_init(model.get_submodule(n).weight, config.rank_alpha(n)[0], config.quant_type, T,
                          config.block_size, config.double_quant)[3]
            for n in find_targets(model, config.targets, config.layers)}


def dequantized_base(model) -> nn.Module:
    """A plain copy of a LoftQ model without its adapter, every adapted weight replaced by Q_T (dense). PEFT's LoftQ
    flow saves this base and reloads it in 4 bits; NF4 without double quant maps Q_T to itself, so bitsandbytes gets
    Q_T back exactly and the saved adapter runs on it as here."""
    plain = copy.deepcopy(model)
    for name, m in [(n, m) for n, m in plain.named_modules() if isinstance(m, QLoRALinear)]:
        if m.merged:
            raise ValueError(f"{name} is merged; call minilora.unmerge(model) first")
        q4 = m.base_layer
        linear = nn.Linear(q4.in_features, q4.out_features, bias=q4.bias is not None, device=q4.packed.device)
        linear.weight, linear.bias = nn.Parameter(q4.weight), q4.bias  # weight: Q_T in W's dtype
        replace_module(plain, name, linear)
    plain.minilora_config = None
    for p in plain.parameters():
        p.requires_grad_(True)
    return plain
