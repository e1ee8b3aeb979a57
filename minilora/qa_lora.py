"""QA-LoRA: Quantization-Aware Low-Rank Adaptation of LLMs (Xu et al. 2023, arXiv 2309.14717).

The paper multiplies row vectors (W is D_in × D_out); minilora stores W as (d_out, d_in). For output j and each
group l of g = D_in/L consecutive input columns, one scale α and one zero β (eq. 1, min-max round-to-nearest):

    W̃ = α·Ŵ + β,   Ŵ = round((W − β)/α) ∈ {0, …, 2^N − 1},   α = (max − min)/(2^N − 1),   β = min
    y = W̃ x + b + s·B A pool(x),   pool(x)_l = Σ_{i in group l} x_i     (§3.3: "summation within each group")

    x ──┬── W̃ = α·Ŵ + β, built on the fly ─────────────────────┐
        └── sum each group of g ── dropout ── A ── B ── ·s ──(+)── y

A is (r, d_in/g), so ΔW = s·B A, expanded over the columns of each group, is constant within a group:
    ΔW[j, i] = s·(BA)[j, l(i)]   ⇒   W̃ + ΔW = α·Ŵ + (β + s·BA)
Merge therefore adds s·BA to the zero points β and leaves the codes Ŵ and scales α untouched: the merged model is
still INT-N with the same integers, and equals the unmerged one up to float rounding (β stays fp32, as the paper's
zero factors are floats). Algorithm 1 writes the same merge in GPTQ's form W̃ = α(Ŵ − z): z ← z − s·BA/α.
Trained: lora_A (r, d_in/g), lora_B (d_out, r) of every linear but the head (all-linear, as QLoRA and the official code).
Frozen: the codes Ŵ (uint8 buffers), α and β (fp32 buffers, (d_out, d_in/g)), biases, embeddings, LayerNorms, lm_head.
Init: LoRA's (A Kaiming-uniform, B = 0; the official code draws A Xavier-uniform), so step 0 is the INT-N *quantized*
    base, not the original: identity_at_init is False (test_at_init_equals_the_int_quantized_base).
Pooling: the paper sums (Algorithm 1: AvgPool1d(g)(x)·g); the official code averages (AvgPool1d(g) alone, and its merge
    divides by g to match); PEFT's use_qalora (GPTQ layers only) averages and multiplies by d_in/g. pool="mean" gives the
    official code's scale. Either way rank ΔW ≤ min(r, d_in/g): few groups cap the rank.
Quantizer: round-to-nearest (eq. 1). The paper quantizes with GPTQ (g = 32, act-order off), which picks Ŵ with
    calibration data; that is out of scope here, and any quantizer that yields (Ŵ, α, β) merges the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from . import lora
from .attach import find_targets, register, replace_module
from .lora import LoRAConfig, LoRALinear

BITS = (2, 3, 4)  # INT-N widths the paper fine-tunes (INT4, and "generalized to INT3 and INT2", Fig. 2)


@dataclass
class QALoRAConfig(LoRAConfig):
    named_adapters: ClassVar[bool] = False  # one group size per layer: lora.add_adapter would reuse it silently
    targets: list[str] | str = "all-linear"  # every linear but the tied head (official code: all linear layers)
    bits: int = 4  # N: codes 0 … 2^N − 1 (paper: INT4, also INT3 and INT2)
    group_size: int = 32  # g = D_in/L input columns per (α, β) pair and per pooled input (paper §4.1 and code: 32)
    pool: str = "sum"  # "sum": the paper (§3.3, Algorithm 1); "mean": the official code's AvgPool1d

    identity_at_init: ClassVar[bool] = False  # equals the INT-N-quantized base at init, not the original
    peft_type = None  # PEFT's use_qalora pools at another scale and exists for GPTQ layers only: no file parity

    def __post_init__(self):
        super().__post_init__()
        check_quant(self.bits, self.group_size)
        if self.pool not in ("sum", "mean"):
            raise ValueError(f"pool={self.pool!r}: pick 'sum' (the paper) or 'mean' (the official code)")
        if self.embedding:
            raise ValueError("QA-LoRA adapts quantized linear layers and the embedding is not quantized; "
                             "set embedding=False (or use LoRAConfig(embedding=True))")

    def to_json(self) -> dict:  # minilora's keys only: PEFT would take A (r, d_in/g) for a plain LoRA's A
        return {k: v for k, v in super().to_json().items() if k.startswith("minilora_")}


def check_quant(bits, group_size, d_in: int | None = None, where: str = "") -> None:
    if bits not in BITS:
        raise ValueError(f"bits {bits!r}: QA-LoRA here quantizes to INT2, INT3 or INT4; pick one of {BITS}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size {group_size!r} must be a positive int (the paper's g is 32)")
    if d_in is not None and d_in % group_size:
        fit = max(d for d in range(1, group_size + 1) if d_in % d == 0)
        raise ValueError(f"g {group_size} does not divide d_in {d_in}{where}; pick a divisor of d_in (e.g. {fit})")


# ------------------------------------------------------------------------ eq. 1: group-wise min-max INT-N
def quantize_groupwise(W: torch.Tensor, bits: int = 4, group_size: int = 32):
    """W (d_out, d_in) -> codes Ŵ uint8 (d_out, d_in), α fp32 (d_out, d_in/g), β fp32 (d_out, d_in/g).
    Round to nearest, so |W − (α·Ŵ + β)| ≤ α/2 for every weight (plus float rounding)."""
    if W.dim() != 2 or not W.is_floating_point() or (not W.is_meta and not torch.isfinite(W).all()):
        raise ValueError(f"quantize_groupwise needs a finite float (d_out, d_in) weight, got {W.dtype} "
                         f"{tuple(W.shape)}; fix NaN/Inf before quantizing")
    d_out, d_in = W.shape
    check_quant(bits, group_size, d_in)
    Wg = W.detach().float().reshape(d_out, d_in // group_size, group_size)  # (d_out, G, g)
    beta = Wg.amin(-1)  # (d_out, G): β = min
    alpha = (Wg.amax(-1) - beta) / (2**bits - 1)  # α = (max − min)/(2^N − 1)
    step = torch.where(alpha > 0, alpha, torch.ones_like(alpha))  # a constant group: codes 0, W = β exactly
    q = torch.round((Wg - beta[..., None]) / step[..., None]).clamp(0, 2**bits - 1)
    return q.to(torch.uint8).reshape(d_out, d_in), alpha, beta


def dequantize_groupwise(q: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """W̃ = α·Ŵ + β, (d_out, d_in) in α's dtype; each (α, β) pair covers g = d_in / α.size(1) columns."""
    d_out, G = alpha.shape
    Wg = alpha[..., None] * q.reshape(d_out, G, -1).to(alpha.dtype) + beta[..., None]  # (d_out, G, g)
    return Wg.reshape(d_out, -1)


class _DequantMatmul(torch.autograd.Function):
    """x W̃ᵀ with W̃ built on the fly; saves the codes, α and β for backward, never the float W̃ (as qlora.py)."""

    @staticmethod
    def forward(ctx, x, qweight, scales, zeros):
        ctx.save_for_backward(qweight, scales, zeros)
        W = dequantize_groupwise(qweight, scales, zeros)  # (d_out, d_in), freed when forward returns
        return x @ W.to(x.dtype).T  # (B, T, d_in) @ (d_in, d_out) -> (B, T, d_out)

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        W = dequantize_groupwise(*ctx.saved_tensors).to(grad_y.dtype)  # dequantize again (QLoRA §3's trick)
        return grad_y @ W, None, None, None  # (B, T, d_out) @ (d_out, d_in) -> (B, T, d_in)


class LinearIntN(nn.Module):
    """A frozen nn.Linear stored as INT-N codes with α, β per (row, group of g columns). Buffers, so .to() moves
    them and state_dict saves them; codes are one per uint8 here (a deployment kernel packs 8/N per byte)."""
    fp32_constants = ("scales", "zeros")  # α, β: fp32 whatever the model's dtype (merge() adds into β)

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None = None, bits: int = 4, group_size: int = 32):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size = bits, group_size
        self.dtype = weight.dtype  # of the weight it replaces: what `weight` returns and the adapter is made in
        q, alpha, beta = quantize_groupwise(weight, bits, group_size)
        self.register_buffer("qweight", q)  # Ŵ uint8 (d_out, d_in)
        self.register_buffer("scales", alpha)  # α fp32 (d_out, d_in/g)
        self.register_buffer("zeros", beta)  # β fp32 (d_out, d_in/g): the only tensor merge() changes
        self.bias = bias  # the same Parameter the nn.Linear had

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized copy (d_out, d_in) in the replaced weight's dtype, for reading; the layer keeps N-bit codes."""
        return dequantize_groupwise(self.qweight, self.scales, self.zeros).to(self.dtype)

    def forward(self, x):
        y = _DequantMatmul.apply(x, self.qweight, self.scales, self.zeros)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")


# ------------------------------------------------------------------------ the adapter
class QALoRALinear(LoRALinear):
    """LoRALinear over a LinearIntN whose A reads the group-pooled input: A (r, d_in/g), B (d_out, r)."""

    def __init__(self, base_layer: LinearIntN, pool: str = "sum"):
        super().__init__(base_layer)
        self.pool = pool
        self.register_buffer("unmerged_zeros", None, persistent=False)  # β before merge(), for unmerge()

    def add(self, name, r, alpha, use_rslora=False, dropout=0.0, parts=None):
        super().add(name, r, alpha, use_rslora, dropout, parts)  # B = 0, scaling, dropout, fused parts: LoRA's
        rows, base = self.lora_A[name].out_features, self.base_layer
        self.lora_A[name] = nn.Linear(base.scales.size(1), rows, bias=False, device=base.scales.device,
                                      dtype=base.dtype)  # (r, d_in/g), in the replaced weight's dtype as B
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))

    def pooled(self, x):
        """(B, T, d_in) -> (B, T, d_in/g): the sum (or mean) of each group of g input features."""
        groups = x.unflatten(-1, (-1, self.base_layer.group_size))  # (B, T, d_in/g, g)
        return groups.sum(-1) if self.pool == "sum" else groups.mean(-1)

    def update(self, x, name):
        return super().update(self.pooled(x), name)  # s·B A dropout(pool(x)): the official code's order

    def zero_shift(self, name) -> torch.Tensor:
        """s·BA (d_out, d_in/g), ÷ g when averaging: the weight change of every column of each group."""
        B, A = self.factors(name)
        shift = self.scaling[name] * (B @ A)  # (d_out, r) @ (r, d_in/g) -> (d_out, d_in/g)
        return shift if self.pool == "sum" else shift / self.base_layer.group_size

    def delta_weight(self, name) -> torch.Tensor:
        return self.zero_shift(name).repeat_interleave(self.base_layer.group_size, dim=1)  # (d_out, d_in)

    def merge(self):
        """β ← β + s·BA for the active adapter; Ŵ and α are not touched. Idempotent."""
        if self.merged or self.active not in self.scaling:
            return
        if self.disabled or self.rows is not None:
            raise ValueError("merge() inside disable_adapters() or adapter_rows(); leave the block first")
        with torch.no_grad():
            shift = self.zero_shift(self.active)
            if not torch.isfinite(shift).all():
                raise ValueError(f"adapter {self.active!r}: s·BA holds NaN or Inf; training diverged, nothing merged")
            self.unmerged_zeros = self.base_layer.zeros  # kept, so unmerge() is exact
            self.base_layer.zeros = self.unmerged_zeros + shift.to(self.unmerged_zeros.dtype)
        self.merged = self.active

    def unmerge(self):
        """Put the original β back, bit for bit."""
        if self.merged:
            self.base_layer.zeros, self.unmerged_zeros, self.merged = self.unmerged_zeros, None, None


# ------------------------------------------------------------------------ attaching, and plain post-training INT-N
@register("qa_lora", QALoRAConfig, lr=1e-2,
          description="QA-LoRA: LoRA on group-summed inputs over an INT-N group-quantized base; merges into the zeros")
def apply(model, config: QALoRAConfig) -> None:
    names = find_targets(model, config.targets, config.layers) if config.targets else []
    for name in names:  # every layer checked before any changes (load_adapter reports a misfit as another model)
        check_quant(config.bits, config.group_size, model.get_submodule(name).in_features, f" of {name}")
    for name in names:
        linear = model.get_submodule(name)  # W0 (d_out, d_in): quantized, then dropped
        base = LinearIntN(linear.weight, linear.bias, config.bits, config.group_size)
        replace_module(model, name, QALoRALinear(base, config.pool))
    lora.apply(model, config)  # B, dropout, scaling as LoRA; QALoRALinear.add gives A its d_in/g inputs


def quantize_linears(model, bits: int = 4, group_size: int = 32, targets="all-linear"):
    """Round-to-nearest INT-N of a plain model (in place): each target nn.Linear -> LinearIntN. Applied to a QLoRA
    model after merge_and_unload it is the paper's "QLoRA w/ GPTQ" row, with this quantizer instead of GPTQ."""
    names = find_targets(model, targets)
    for name in names:
        check_quant(bits, group_size, model.get_submodule(name).in_features, f" of {name}")
    for name in names:
        linear = model.get_submodule(name)
        replace_module(model, name, LinearIntN(linear.weight, linear.bias, bits, group_size))
    return model
