"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv 2402.09353).

    W' = m · (W0 + s·BA) / ‖W0 + s·BA‖        s = alpha/r, norm per output feature (row i of the (d_out, d_in) W)
    h  = W' x + b = f ⊙ (W0 x + s·B A x) + b,   f = m / ‖W0 + s·BA‖ (d_out,)

    x ──┬── W0 ──────────────────────┐
        └── A ── B ── ·s ───────────(+)── ⊙ m/‖W0 + s·BA‖ ──(+ b)── h

The weight is split into a magnitude m (d_out,) and a direction (W0 + s·BA)/‖·‖ whose rows have unit norm;
LoRA's B A moves the direction, m the length of each row.
Trained: lora_magnitude_vector (m), lora_A, lora_B of each adapted module.
Frozen: W0 (and its bias b, which is added after the rescaling, unscaled).
Init: m = ‖W0‖_row, A Kaiming-uniform, B = 0 (LoRA's), so W' = ‖W0‖ · W0/‖W0‖ = W0: the base model at step 0.
Norm: detached from the graph by default (paper §4.3; `detach_norm`), and computed from (d_out, r) pieces,
    never the (d_out, d_in) matrix W0 + s·BA (see DoRALinear.weight_norm).
Merge: W0 <- f ⊙ (W0 + s·BA) row by row; exact, and unmerge keeps f to undo it.
Everything else (targets, ranks, named adapters, files) is LoRA's (lora.py): DoRALinear is a LoRALinear with
one more tensor, saved under PEFT's key `lora_magnitude_vector`, and `use_dora: true` in adapter_config.json.
QDoRA, the same DoRALinear over QLoRA's frozen NF4 layer (qlora.Linear4bit), is the last section of this file.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lora
from .attach import find_targets, register, replace_module
from .lora import LoRAConfig, LoRALinear
from .qlora import Linear4bit, QLoRAConfig
from .train import Callback


@dataclass
class DoRAConfig(LoRAConfig):
    """LoRAConfig's fields (r, alpha, dropout, targets, layers, ...), plus:"""
    detach_norm: bool = True  # paper §4.3: ‖W0 + s·BA‖ is a constant in backward (False: it is differentiated)

    def __post_init__(self):
        super().__post_init__()
        if self.embedding:
            raise ValueError("DoRA on the embedding (embedding=True) is not implemented; "
                             "adapt linears only, or use LoRAConfig(embedding=True)")

    @classmethod
    def peft_match(cls, raw: dict) -> bool:
        return bool(raw.get("use_dora"))

    def trainable(self, name: str) -> bool:
        return super().trainable(name) or name.endswith(f".lora_magnitude_vector.{self.adapter_name}")

    def to_json(self) -> dict:
        return {**super().to_json(), "use_dora": True}  # PEFT: a LoRA adapter with use_dora

    @classmethod
    def from_json(cls, raw: dict) -> "DoRAConfig":
        if "minilora_config" in raw:  # saved by minilora
            return cls(**raw["minilora_config"])
        return super().from_json({**raw, "use_dora": False})  # PEFT's fields, read as LoRA's


class DoRALinear(LoRALinear):
    """nn.Linear W0 (d_out, d_in) plus named DoRA adapters: LoRA's A, B and a magnitude m (d_out,) each."""
    _per_adapter = LoRALinear._per_adapter + ("lora_magnitude_vector",)

    def __init__(self, base_layer: nn.Linear, detach_norm: bool = True):
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()  # adapter -> m (d_out,)
        self.detach_norm = detach_norm
        self.merged_norm: torch.Tensor | None = None  # ‖W0 + s·BA‖ at merge(), for unmerge()
        self.unmerged_base: tuple[nn.Module] | None = None  # a 4-bit base set aside by merge() (QDoRA)
        self._w0_sq, self._w0_sq_key = None, None  # cache of ‖w_i‖², and the W0 version it was computed from

    def add(self, name, r, alpha, use_rslora=False, dropout=0.0, parts=None):
        super().add(name, r, alpha, use_rslora, dropout, parts)  # A Kaiming-uniform, B = 0
        with torch.no_grad():
            m = self.weight_norm(name)  # B = 0, so this is ‖W0‖ per row: W' = W0 at init
        self.lora_magnitude_vector[name] = nn.Parameter(m.to(self.base_layer.weight.dtype))

    # ---------------------------------------------------------------- the norm, without the (d_out, d_in) matrix
    def w0_sq(self) -> torch.Tensor:
        """‖w_i‖² for each row w_i of W0, (d_out,) in fp32. W0 is frozen, so it is computed once; again only
        when W0 is changed in place (merge, a reload) or moved, which changes its version counter or storage.
        The key is read from the tensors that store W0: nn.Linear's weight, or a Linear4bit's NF4 buffers
        (whose .weight is a fresh dequantized copy at every access, so it cannot serve as a key)."""
        base = self.base_layer
        stored = [t for n, t in (*base.named_parameters(recurse=False), *base.named_buffers(recurse=False))
                  if n != "bias"]
        key = [(t.data_ptr(), t._version, t.device, t.dtype) for t in stored]
        if key != self._w0_sq_key:
            with torch.no_grad():
                self._w0_sq = base.weight.float().square().sum(1)  # (d_out, d_in) -> (d_out,)
            self._w0_sq_key = key
        return self._w0_sq

    def weight_norm(self, name: str) -> torch.Tensor:
        """‖W0 + s·BA‖ per row, (d_out,) fp32. Row i of W0 + s·BA is w_i + s·B_i A (w_i (1, d_in), B_i (1, r)):

            ‖w_i + s·B_i A‖² = ‖w_i‖² + 2s·⟨w_i, B_i A⟩ + s²·‖B_i A‖²
            ⟨w_i, B_i A⟩ = B_i · (A w_iᵀ)       -> row sums of B ⊙ (W0 Aᵀ)
            ‖B_i A‖²     = B_i (A Aᵀ) B_iᵀ      -> row sums of (B (A Aᵀ)) ⊙ B

        so the largest new tensor is (d_out, r), not (d_out, d_in); ‖w_i‖² is cached (w0_sq)."""
        B, A = self.factors(name)  # B (d_out, r), A (r, d_in)
        s, W0 = self.scaling[name], self.base_layer.weight
        kind = W0.device.type  # in the weights' precision, even under bf16 autocast (meta has no autocast)
        with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext():
            WA = W0 @ A.T  # (d_out, d_in) @ (d_in, r) -> (d_out, r): row i is (A w_iᵀ)ᵀ
            AA = A @ A.T  # (r, d_in) @ (d_in, r) -> (r, r)
            cross = (B * WA).sum(1)  # (d_out, r) -> (d_out,): ⟨w_i, B_i A⟩
            ba_sq = ((B @ AA) * B).sum(1)  # (d_out, r) @ (r, r) -> (d_out, r) -> (d_out,): ‖B_i A‖²
            sq = self.w0_sq() + 2 * s * cross.float() + s * s * ba_sq.float()
        return sq.clamp_min(0).sqrt()  # clamp: rounding must not make a square negative

    def scale(self, name: str) -> torch.Tensor:
        """f = m / ‖W0 + s·BA‖ (d_out,); the norm detached (no gradient through it) when detach_norm."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norm):  # paper §4.3
            norm = self.weight_norm(name)
        return self.lora_magnitude_vector[name] / norm

    # ---------------------------------------------------------------- forward
    def lora_out(self, x, name):
        """s·B A x, on x as given (the caller applies dropout)."""
        B, A = self.factors(name)
        return ((x @ A.T) @ B.T) * self.scaling[name]  # (B, T, d_in) @ (d_in, r) @ (r, d_out) -> (B, T, d_out)

    def forward(self, x):
        name = self.active
        if self.rows is not None or self.disabled or self.merged or name not in self.scaling:
            return super().forward(x)  # LoRALayer's routing: a mixed batch adds update() per adapter
        if self.training and not isinstance(self.lora_dropout[name], nn.Identity):
            return self.base_layer(x) + self.update(x, name)
        y = self.base_layer(x)  # W0 x + b: the one (d_in -> d_out) matmul, reused
        f = self.scale(name).to(y.dtype)  # (d_out,); in y's dtype (bf16 under autocast) so h stays bf16
        z = y + self.lora_out(x, name)  # W0 x + b + s·B A x: autograd keeps this one (B, T, d_out) for ∂L/∂m
        b = self.base_layer.bias
        return f * z if b is None else f * z + (1 - f) * b.to(y.dtype)  # = f ⊙ (W0 x + s·B A x) + b, b unscaled

    def update(self, x, name):
        """h − (W0 x + b) = (f − 1) ⊙ W0 x' + f ⊙ s·B A x', x' = dropout(x): PEFT's form, used with
        dropout in training (the base path sees x, the DoRA terms x') and per adapter in a mixed batch."""
        x = self.lora_dropout[name](x)
        f = self.scale(name)
        w0x = F.linear(x, self.base_layer.weight)  # (B, T, d_in) @ (d_in, d_out): a second matmul with W0
        return ((f - 1) * w0x + f * self.lora_out(x, name)).to(w0x.dtype)

    # ---------------------------------------------------------------- merging
    def delta_weight(self, name: str) -> torch.Tensor:
        """W' − W0 = f ⊙ (W0 + s·BA) − W0 (f per row), from the unmerged W0."""
        W0, (B, A) = self.base_layer.weight, self.factors(name)
        f = self.scale(name)[:, None]  # (d_out, 1)
        return f * (W0 + self.scaling[name] * (B @ A)) - W0  # (d_out, r) @ (r, d_in) -> (d_out, d_in)

    def merge(self):
        """W0 <- f ⊙ (W0 + s·BA) (LoRALayer.merge adds delta_weight); idempotent. Keeps the norm for unmerge.
        A base whose weight cannot be written (QDoRA's Linear4bit: 4-bit storage) is set aside and replaced by
        an nn.Linear holding its dequantized W0 in W0's dtype, which then takes the merge as above."""
        if self.merged or self.active not in self.scaling:
            return
        with torch.no_grad():
            self.merged_norm = self.weight_norm(self.active)
        base = self.base_layer
        if not isinstance(base, nn.Linear):
            W = base.weight  # (d_out, d_in), dequantized
            self.base_layer = nn.Linear(W.size(1), W.size(0), bias=False, device="meta")
            self.base_layer.weight, self.base_layer.bias = nn.Parameter(W, requires_grad=False), base.bias
        try:
            super().merge()
        finally:
            if not self.merged:  # refused (NaN, or inside adapter_rows): the base is back as it was
                self.base_layer = base
        self.unmerged_base = None if self.base_layer is base else (base,)  # a tuple: kept out of state_dict

    def unmerge(self):
        """W0 <- W'/f − s·BA, with f from the norm kept at merge(); exact up to float rounding. A base set
        aside by merge() is put back instead: exact, bit for bit."""
        if self.merged and self.unmerged_base:
            self.base_layer, self.unmerged_base = self.unmerged_base[0], None
            self.merged, self.merged_norm = None, None
        if self.merged:
            name, W = self.merged, self.base_layer.weight
            B, A = self.factors(name)
            with torch.no_grad():
                f = (self.lora_magnitude_vector[name] / self.merged_norm)[:, None]  # (d_out, 1)
                W.copy_(W / f - self.scaling[name] * (B @ A))
            self.merged, self.merged_norm = None, None


@register("dora", DoRAConfig, lr=1e-2,
          description="DoRA: LoRA on the direction of W0, plus a trained magnitude per row")
def apply(model, config: DoRAConfig) -> None:
    for n in find_targets(model, config.targets, config.layers):  # the nn.Linear modules LoRA would adapt
        replace_module(model, n, DoRALinear(model.get_submodule(n), config.detach_norm))
    lora.apply(model, config)  # LoRA's attach finds the DoRALinear wrappers and adds its adapter to each


# ---------------------------------------------------------------- the paper's §4.1 analysis, in miniature
def magnitude_direction_change(w0: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """Liu et al. §4.1 (Fig. 2), per output feature i of the (d_out, d_in) weights:
    ΔM = mean_i |‖w_i‖ − ‖w0_i‖|,   ΔD = mean_i (1 − cos(w_i, w0_i))."""
    dM = (w.norm(dim=1) - w0.norm(dim=1)).abs().mean()
    dD = (1 - F.cosine_similarity(w, w0, dim=1)).mean()
    return dM.item(), dD.item()


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a (possibly adapted) linear applies: W0 + ΔW of its active adapter, or its own weight."""
    if hasattr(module, "base_layer"):
        W = module.base_layer.weight
        return W if module.merged or module.active not in module.scaling else W + module.delta_weight(module.active)
    return module.weight


class DecompositionTracker(Callback):
    """Records (step, ΔM, ΔD) of the query third of every layer's c_attn at each evaluation, against the
    base's weights: the paper's Fig. 2 measures query weights the same way."""

    def __init__(self, model):
        self.names = [n for n, m in model.named_modules() if n.endswith("attn.c_attn")]
        C = model.config.n_embd
        self.rows = slice(0, C)  # q = rows 0..C-1 of the fused (3C, C) weight
        with torch.no_grad():
            self.w0 = {n: effective_weight(model.get_submodule(n))[self.rows].detach().clone() for n in self.names}
        self.points = []  # (step, layer, ΔM, ΔD)

    @torch.no_grad()
    def on_eval(self, state, metrics):
        for layer, n in enumerate(self.names):
            w = effective_weight(state.model.get_submodule(n))[self.rows].float()
            self.points.append((state.step, layer, *magnitude_direction_change(self.w0[n].float(), w)))


# ---------------------------------------------------------------- QDoRA: DoRA on QLoRA's NF4 base (arXiv 2305.14314)
# h = m ⊙ (W0q x + s·B A x)/‖W0q + s·BA‖ + b,   W0q = doubleDequant(c1, c2, W_NF4) (qlora.py) in place of W0.
# Nothing new is computed: DoRALinear wraps a Linear4bit, whose forward dequantizes on the fly and whose .weight
# (a dequantized copy) is the W0 of the norm. Trained: m, A, B. Frozen: the NF4 buffers. Init: m = ‖W0q‖_row,
# B = 0, so step 0 is the *quantized* base (identity_at_init False, as QLoRA's). The default detach_norm matters
# more here: attached, backward of W0q Aᵀ in weight_norm would keep a dense W0q per layer, which 4 bits avoid.
@dataclass
class QDoRAConfig(QLoRAConfig, DoRAConfig):
    """QLoRAConfig's fields (targets "all-linear", block_size, double_quant, compute_dtype, paged_optimizer)
    and DoRAConfig's detach_norm. Python's method order (QLoRAConfig, DoRAConfig, LoRAConfig) gives QLoRA's
    defaults, to_json and identity_at_init = False, and DoRA's magnitude in trainable(), its embedding check,
    peft_match (use_dora) and "use_dora": true in to_json (QLoRA's to_json extends DoRA's through super())."""


@register("qdora", QDoRAConfig, lr=1e-2,
          description="QDoRA: DoRA on all linears of an NF4-quantized frozen base")
def apply_qdora(model, config: QDoRAConfig) -> None:
    for n in find_targets(model, config.targets, config.layers):
        linear = model.get_submodule(n)  # the nn.Linear W0 (d_out, d_in): quantized, then dropped
        base = Linear4bit(linear.weight, linear.bias, config.block_size, config.double_quant, config.compute_dtype)
        replace_module(model, n, DoRALinear(base, config.detach_norm))
    lora.apply(model, config)  # m = ‖W0q‖_row, A, B on each DoRALinear, as DoRA adds them
