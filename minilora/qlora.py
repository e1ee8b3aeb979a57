"""QLoRA: LoRA on a frozen 4-bit NormalFloat base (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, arXiv 2305.14314).

    Y = X · doubleDequant(c1, c2, W_NF4) + X · L1 · L2                  (eq. 5)
    doubleDequant(c1, c2, W_NF4) = dequant(dequant(c1, c2), W_NF4) ≈ W0    (code: Linear4bit.quant.dequantize())
    L1 = lora_Aᵀ (d_in, r), L2 = (alpha/r) · lora_Bᵀ (r, d_out)          (the paper multiplies row vectors, X·W;
                                                                      the code stores W0 as (d_out, d_in))

    x ──┬── dequant(W_NF4) on the fly (bf16 on GPU) ────────┐
        └── dropout ── A ── B ── ·alpha/r ──────────────────(+)── y

Trained: lora_A, lora_B of every adapted linear (all of them by default: the paper's Fig. 2 finds that LoRA on
    q, v only misses full fine-tuning, LoRA on all linear layers matches it).
Frozen: the NF4 weights (uint8 buffers, no gradient ever exists for them), biases, embeddings, LayerNorms and
    lm_head (tied to wte, never quantized).
Init: as LoRA (A Kaiming-uniform, B = 0), so at step 0 the model equals the *quantized* base, not the original:
    identity_at_init is False here, and test_qlora_at_init_equals_the_nf4_quantized_base checks the true claim.
Backward: only ∂E/∂L1, ∂E/∂L2 are needed, but ∂E/∂X flows through W, so the backward pass dequantizes
    W_NF4 again (§3); Linear4bit saves nothing but the 4-bit tensors for it.
Memory per frozen weight (nf4.bits_per_param): 4 bits + fp32 absmax per 64 = 4.5 bits; with double quant the
    absmax is 8 bits per 64 plus an fp32 c1 per 64·256: 4 + 8/64 + 32/16384 ≈ 4.127 bits (−0.373 bits, §3).
Merging a 4-bit base cannot be done in place: see merge() for the three ways and merge_report() for their cost.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lora
from .attach import find_targets, register, replace_module, unmerge
from .kernels import dequantize
from .lora import LoRAConfig, LoRALinear
from .nf4 import NF4Weight, bits_per_param, quantize_nf4
from .paged_adamw import PagedAdamW

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TENSORS = ("packed", "absmax", "absmax_scale", "absmax_offset")  # NF4Weight's tensors, Linear4bit's buffers


@dataclass
class QLoRAConfig(LoRAConfig):
    targets: list[str] | str = "all-linear"  # the paper adapts every linear layer (Fig. 2)
    block_size: int = 64  # weights per NF4 absmax c2 (paper: 64)
    double_quant: bool = True  # c2 to 8 bits in blocks of 256 with fp32 c1: 4.5 → 4.127 bits per weight
    compute_dtype: str = "auto"  # "bf16", "fp16", "fp32", or "auto": autocast's dtype when on, else the input's
    paged_optimizer: bool = False  # train with PagedAdamW (Adam state in CPU memory, paged in per step)

    identity_at_init: ClassVar[bool] = False  # equals the NF4-quantized base at init, not the original

    def __post_init__(self):
        super().__post_init__()
        if self.compute_dtype not in (*DTYPES, "auto"):
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: pick one of {[*DTYPES, 'auto']}")

    def optimizer(self, model, lr, weight_decay):
        if not self.paged_optimizer:
            return None  # the loop's default AdamW
        params = [p for p in model.parameters() if p.requires_grad]  # train.default_optimizer's groups:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},  # decay matrices
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # not vectors
        return PagedAdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))

    def to_json(self) -> dict:
        """PEFT's LORA fields (QLoRA in PEFT is LoRA on a bitsandbytes 4-bit base) plus ours."""
        return {**super().to_json(),
                "fan_in_fan_out": False,  # bitsandbytes' Linear4bit holds W as (out, in), not Conv1D's (in, out)
                "minilora_quantization": {  # the BitsAndBytesConfig that makes PEFT's base equal ours
                    "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                    "bnb_4bit_use_double_quant": self.double_quant, "bnb_4bit_blocksize": self.block_size,
                    "bnb_4bit_compute_dtype": {"auto": "bfloat16", "bf16": "bfloat16", "fp16": "float16",
                                               "fp32": "float32"}[self.compute_dtype]}}


# ------------------------------------------------------------------------ the frozen 4-bit linear
class _DequantLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W = doubleDequant(W_NF4) made on the fly; saves only the 4-bit tensors for backward."""

    @staticmethod
    def forward(ctx, x, bias, q: NF4Weight, dtype, out_dtype):
        W = dequantize(q, dtype)  # (d_out, d_in) in the compute dtype; freed when forward returns
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit here
            y = F.linear(x.to(dtype), W, None if bias is None else bias.to(dtype))  # (B, T, d_in) -> (B, T, d_out)
        ctx.save_for_backward(*(getattr(q, k) for k in _TENSORS))  # n/2 bytes + constants, never W
        ctx.meta = dataclasses.replace(q, **dict.fromkeys(_TENSORS))  # shape, dtype, block sizes
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:  # ∂E/∂X = ∂E/∂Y · W: dequantize again (§3), in the compute dtype
            W = dequantize(dataclasses.replace(ctx.meta, **dict(zip(_TENSORS, ctx.saved_tensors))), ctx.dtype)
            with torch.autocast(grad_y.device.type, enabled=False):
                grad_x = (grad_y.to(ctx.dtype) @ W).to(ctx.x_dtype)  # (B, T, d_out) @ (d_out, d_in) -> (B, T, d_in)
        if ctx.needs_input_grad[1]:  # a bias trained with bias="all" / "lora_only"
            grad_bias = grad_y.reshape(-1, grad_y.size(-1)).sum(0)
        return grad_x, grad_bias, None, None, None


class Linear4bit(nn.Module):
    """A frozen nn.Linear stored as NF4 (bitsandbytes' format, bit for bit). Its NF4Weight's tensors are
    buffers, so .to(device) moves them and state_dict holds them; the weight has no gradient."""
    fp32_constants = ("absmax", "absmax_scale", "absmax_offset")  # c2 (fp32 without double quant), c1, offset:
    # fp32 whatever the model's dtype, as bitsandbytes keeps them (a bf16 c1 would move every weight)

    def __init__(self, weight: torch.Tensor, bias: nn.Parameter | None = None, block_size: int = 64,
                 double_quant: bool = True, compute_dtype: str = "auto"):
        super().__init__()
        q = quantize_nf4(weight.detach(), block_size, double_quant)  # weight (d_out, d_in)
        self.out_features, self.in_features = weight.shape
        for k in _TENSORS:
            self.register_buffer(k, getattr(q, k))  # absmax_scale / offset are None without double quant
        self.meta = dataclasses.replace(q, **dict.fromkeys(_TENSORS))  # the rest: shape, dtype, block sizes
        self.bias = bias  # the same Parameter the nn.Linear had
        self.compute_dtype = compute_dtype

    @property
    def quant(self) -> NF4Weight:
        return dataclasses.replace(self.meta, **{k: getattr(self, k) for k in _TENSORS})

    @property
    def weight(self) -> torch.Tensor:
        """A dequantized copy in the original dtype, for reading (shape, dtype, device); the layer keeps 4 bits."""
        return dequantize(self.quant)

    def forward(self, x):
        autocast = torch.is_autocast_enabled(x.device.type)
        if self.compute_dtype != "auto":
            dtype = DTYPES[self.compute_dtype]
        else:  # bf16 under the loop's CUDA autocast, the input's dtype (fp32 on CPU) otherwise
            dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        return _DequantLinear.apply(x, self.bias, self.quant, dtype, dtype if autocast else x.dtype)

    def _apply(self, fn, recurse=True):
        # model.half() / .bfloat16() would round the fp32 constants c1, c2 and the offset and change every
        # weight: they keep their dtype and only follow the packed bytes to their device
        constants = {k: t for k, t in self._buffers.items() if t is not None and t.is_floating_point()}
        super()._apply(fn, recurse)
        for k, t in constants.items():
            self._buffers[k] = t.to(self.packed.device)
        return self

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.meta.block_size}, double_quant={self.meta.double_quant}")


class QLoRALinear(LoRALinear):
    """LoRALinear whose base_layer is a Linear4bit. ΔW cannot be added into 4-bit storage in place, so merge()
    swaps base_layer for a merged layer and keeps the 4-bit one aside (outside state_dict) for unmerge()."""

    def merge(self, mode: str = "dequant", original: torch.Tensor | None = None, dtype=None):
        """mode "dequant": nn.Linear with W = doubleDequant(W_NF4) + ΔW (same outputs up to rounding);
        "original": nn.Linear with W = original + ΔW (the unquantized W0, if you kept it);
        "requantize": Linear4bit of NF4(doubleDequant(W_NF4) + ΔW) (4-bit again, with a new rounding error).
        dtype: of the merged dense weight; default the dtype W0 had (pass torch.bfloat16 for 16 bits)."""
        if self.merged or self.active not in self.scaling:
            return
        if self.disabled or self.rows is not None:
            raise ValueError("merge() inside disable_adapters() or adapter_rows(); leave the block first")
        q4 = self.base_layer
        delta = self.delta_weight(self.active).float()  # (d_out, d_in)
        if not torch.isfinite(delta).all():
            raise ValueError(f"adapter {self.active!r}: ΔW holds NaN or Inf; training diverged, nothing merged")
        if mode == "original":
            if original is None or tuple(original.shape) != tuple(delta.shape):
                got = None if original is None else tuple(original.shape)
                raise ValueError(f"merge(mode='original') needs the unquantized weight {tuple(delta.shape)}, got "
                                 f"{got}; use qlora.merge(model, 'original', original=base.state_dict())")
            W = original.to(delta.device).float() + delta
        elif mode in ("dequant", "requantize"):
            W = q4.quant.dequantize(torch.float32) + delta
        else:
            raise ValueError(f"mode={mode!r}: pick 'dequant', 'original' or 'requantize'")
        with torch.no_grad():
            if mode == "requantize":
                merged = Linear4bit(W.to(q4.meta.dtype), q4.bias, q4.meta.block_size, q4.meta.double_quant,
                                    q4.compute_dtype)
            else:
                merged = nn.Linear(q4.in_features, q4.out_features, bias=q4.bias is not None, device=W.device)
                merged.weight = nn.Parameter(W.to(dtype or q4.meta.dtype), requires_grad=False)
                merged.bias = q4.bias
        self.unmerged_base = (q4,)  # a tuple: not registered as a submodule, so not in state_dict
        self.base_layer = merged
        self.merged = self.active

    def unmerge(self):
        """Put the 4-bit layer back: exact, bit for bit (nothing was subtracted)."""
        if self.merged:
            self.base_layer, self.unmerged_base, self.merged = self.unmerged_base[0], None, None


# ------------------------------------------------------------------------ attaching
@register("qlora", QLoRAConfig, lr=1e-2, description="QLoRA: LoRA on all linears of an NF4-quantized frozen base")
def apply(model, config: QLoRAConfig) -> None:
    for name in find_targets(model, config.targets, config.layers) if config.targets else []:
        linear = model.get_submodule(name)  # the nn.Linear W0 (d_out, d_in): quantized, then dropped
        base = Linear4bit(linear.weight, linear.bias, config.block_size, config.double_quant, config.compute_dtype)
        replace_module(model, name, QLoRALinear(base))
    lora.apply(model, config)  # A, B on each QLoRALinear exactly as LoRA adds them (same init, same names)


# ------------------------------------------------------------------------ merging a 4-bit base
def merge(model, mode: str = "dequant", original: dict | None = None, dtype=None):
    """Fold ΔW into every QLoRA layer. mode: "dequant" (16-bit, or `dtype`, weights = doubleDequant(W_NF4)
    + ΔW), "original" (weights = W0 + ΔW, W0 from `original`, the base model's state_dict saved before
    attaching), "requantize" (NF4 again). Undo with minilora.unmerge(model); merge_report measures each."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}
    missing = [n + ".weight" for n in layers if mode == "original" and n + ".weight" not in (original or {})]
    if missing:  # checked before any layer changes
        raise ValueError(f"merge(mode='original') needs the unquantized weights, e.g. {missing[:2]}: pass "
                         f"original=<the base model's state_dict(), saved before attaching>")
    for name, m in layers.items():
        m.merge(mode, None if original is None else original[name + ".weight"], dtype)
    return model


@torch.no_grad()
def merge_report(model, idx, original: dict | None = None, dtype=None) -> dict:
    """For each merge mode vs the unmerged QLoRA model on tokens idx (B, T): max |Δlogits|, mean KL(unmerged ‖
    merged) per position (nats), and next-token perplexity before and after. "original" needs `original`."""
    if any(getattr(m, "merged", None) for m in model.modules()):
        raise ValueError("merge_report compares against the unmerged model; call minilora.unmerge(model) first")
    was_training = model.training
    model.eval()
    x, y = idx[:, :-1], idx[:, 1:]  # predict token t+1 from tokens ≤ t
    ref = model(x)[0].float()  # (B, T-1, V)
    logp_ref = ref.log_softmax(-1)
    ppl = lambda logits: math.exp(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())  # noqa: E731
    report = {"unmerged": {"ppl": ppl(ref)}}
    for mode in ("dequant", "original", "requantize"):
        if mode == "original" and original is None:
            continue
        merge(model, mode, original, dtype)
        out = model(x)[0].float()
        unmerge(model)
        logp = out.log_softmax(-1)
        report[mode] = {"max_abs_dlogits": (out - ref).abs().max().item(),
                        "kl": (logp_ref.exp() * (logp_ref - logp)).sum(-1).mean().item(),  # KL(p_ref ‖ p)
                        "ppl": ppl(out), "dppl": ppl(out) - report["unmerged"]["ppl"]}
    model.train(was_training)
    return report


# ------------------------------------------------------------------------ memory arithmetic
def weight_memory_gb(n_params: float, bits: float | str = "nf4", block_size: int = 64, double_quant: bool = True):
    """GB (10^9 bytes) to hold n_params weights: bits=16 / 32, or "nf4" (4 bits + its constants, bits_per_param)."""
    b = bits_per_param(block_size, double_quant) if bits == "nf4" else bits
    return n_params * b / 8 / 1e9


def memory_table(sizes=(1e9, 7e9, 65e9)) -> list[dict]:
    """The lesson's table, in GB: 16-bit weights, NF4 with and without double quant, what double quant saves,
    and 16-bit full fine-tuning at 12 bytes/param (weights 2 + gradients 2 + fp32 Adam moments 8)."""
    rows = []
    for n in sizes:
        nf4, nf4_dq = weight_memory_gb(n, "nf4", double_quant=False), weight_memory_gb(n, "nf4")
        rows.append({"params_b": n / 1e9, "bf16": weight_memory_gb(n, 16), "nf4": nf4, "nf4_dq": nf4_dq,
                     "dq_saves": nf4 - nf4_dq, "full_ft_16bit": n * 12 / 1e9})
    return rows
