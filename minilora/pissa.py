"""PiSSA (Meng, Wang, Zhang 2024, arXiv 2404.02948) and OLoRA (Büyükakyüz 2024, arXiv 2406.01775): LoRA whose
factors start as a piece of the weight itself, with the rest of the weight frozen; and LoRA's Gaussian init.

    h = W_res x + s·B A x        W_res = W0 − s·B0 A0,  s = alpha/r (LoRA's scaling)
    so W_res + s·B0 A0 = W0: step 0 is the base model, although B0 ≠ 0.

    PiSSA   W0 = U S Vᵀ (SVD)   B0 = U_r (S_r/s)^½ (d_out, r)   A0 = (S_r/s)^½ V_rᵀ (r, d_in)   s·B0A0 = U_r S_r V_rᵀ
    OLoRA   W0 = Q R (QR)       B0 = Q[:, :r]      (d_out, r)   A0 = R[:r]          (r, d_in)   s·B0A0 = s·Q_r R_r
    gaussian  A0 ~ N(0, std 1/r), B0 = 0, W_res = W0                      (PEFT's init_lora_weights="gaussian")

Trained: lora_A, lora_B of each adapted module (LoRA's names and shapes).
Frozen: W_res, written into base_layer.weight in place of W0.
Init: PiSSA trains the r principal singular directions of W0 and freezes the rest (the paper's "residual"): the
    update starts on the part of W0 that matters most, where LoRA starts from B = 0. Dividing S_r by s (as PEFT)
    makes s·B0A0 = U_r S_r V_rᵀ for any alpha. OLoRA trains an orthonormal basis Q_r of the span of W0's first r
    columns (and R_r), without dividing by s (as PEFT). "pissa_niter_K" replaces the SVD by a randomized one
    (Halko et al.: K subspace iterations, torch.svd_lowrank as PEFT), seeded so that it is reproducible.
Precision: the factors are computed in float64 and rounded to W0's dtype; W_res is computed from the rounded
    factors and rounded once, so W_res + s·B0A0 (in float64) equals W0 to half an ulp of |W_res|.
Signs: singular vectors (and QR columns) are defined up to a sign flip of a pair (u_i, v_i); s·B0A0 and W_res
    are not, so a file loads the same whatever sign a LAPACK picks (tests compare A, B up to that sign).
Files: A and B alone, as LoRA's, plus init_lora_weights; they only work on top of W_res, so load_adapter
    re-attaches (recomputing the deterministic SVD / QR of W0), then loads them. to_lora() rewrites them as a
    plain rank-2r LoRA for the original W0: W_res + s·BA = W0 + s·[B, −B0][A; A0] (PEFT's
    save_pretrained(path_initial_model_for_weight_conversion=...)).
QPiSSA: quantizing W_res instead of W0 loses less (its large singular values went to B0A0): quantization_error().
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import ClassVar
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import lora
from .attach import attach, register
from .lora import LoRAConfig, LoRALinear
from .nf4 import dequantize_nf4, quantize_nf4

RESIDUAL_INITS = ("pissa", "olora")  # and "pissa_niter_<K>": these rewrite W0 into W_res
SEED = 0  # of the randomized SVD: attach and load_adapter must draw the same W_res


@dataclass
class PiSSAConfig(LoRAConfig):
    """LoRAConfig's fields (r, alpha, targets, layers, rank_pattern, ...), plus:"""
    named_adapters: ClassVar[bool] = False  # initialized at attach: lora.add_adapter would skip that
    init: bool | str = "pissa"  # PEFT's init_lora_weights: "pissa", "pissa_niter_<K>" (randomized SVD, K
    # iterations), "olora", "gaussian" (A ~ N(0, std 1/r), B = 0) or True (LoRA's Kaiming-uniform A, B = 0)

    def __post_init__(self):
        super().__post_init__()
        if not (self.init is True or self.init in ("gaussian", *RESIDUAL_INITS)
                or re.fullmatch(r"pissa_niter_\d+", str(self.init))):
            raise ValueError(f"init={self.init!r}: choose 'pissa', 'pissa_niter_<K>' (e.g. 'pissa_niter_4'), "
                             f"'olora', 'gaussian' or True (PEFT's init_lora_weights values)")
        if self.embedding or self.fused_qkv:
            raise ValueError("PiSSA/OLoRA init of the embedding (embedding=True) or of fused q/k/v thirds "
                             "(fused_qkv) is not implemented; adapt whole linears (targets) instead")

    @classmethod
    def peft_match(cls, raw: dict) -> bool:  # PEFT saves PiSSA as peft_type LORA + init_lora_weights
        return str(raw.get("init_lora_weights")).startswith("pissa")

    def to_json(self) -> dict:
        return {**super().to_json(), "init_lora_weights": self.init}

    @classmethod
    def from_json(cls, raw: dict) -> "PiSSAConfig":
        config = super().from_json(raw)  # minilora's own fields, or PEFT's LORA fields
        return config if "minilora_config" in raw else dataclasses.replace(
            config, init=raw.get("init_lora_weights", config.init))


@dataclass
class OLoRAConfig(PiSSAConfig):
    """PiSSAConfig with init="olora": the same class of method (a residual base), registered under its own name."""
    init: bool | str = "olora"

    @classmethod
    def peft_match(cls, raw: dict) -> bool:
        return raw.get("init_lora_weights") == "olora"


def initial_factors(W: torch.Tensor, r: int, scaling: float, init) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B0, A0) of a residual init, in float64, for W (d_out, d_in); None for the inits that keep W0 (B0 = 0)."""
    if init is True or init == "gaussian":
        return None
    W = W.detach().double()
    if init == "olora":
        Q, R = torch.linalg.qr(W)  # (d_out, k) orthonormal columns, (k, d_in) upper triangular, k = min(d_out, d_in)
        return Q[:, :r], R[:r]  # W[:, :r] = Q_r R_r[:, :r]: Q_r spans W0's first r columns
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (d_out, k), (k,), (k, d_in), S descending
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:  # "pissa_niter_K": Halko et al.'s randomized range finder + K power iterations, then a small SVD
        with torch.random.fork_rng(devices=[W.device] if W.is_cuda else []):
            torch.manual_seed(SEED)
            U, S, V = torch.svd_lowrank(W, q=r, niter=int(init.rsplit("_", 1)[1]))  # (d_out, r), (r,), (d_in, r)
        Vh = V.T
    root = (S / scaling).sqrt()  # (S_r/s)^½, so that s·B0A0 = U_r S_r V_rᵀ
    return U * root, root[:, None] * Vh  # (d_out, r), (r, d_in)


def adapted(model, name: str) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and name in m.scaling]


def _rounded_factors(n, m, name, init, W):
    """initial_factors for module n (holding adapter `name`), rounded to W's dtype; refuses a rank too large."""
    B, A = m.params(name)  # (d_out, r), (r, d_in)
    if init not in (True, "gaussian") and A.size(0) > min(W.shape):
        raise ValueError(f"{n}: r={A.size(0)} is larger than min(d_out, d_in) = {min(W.shape)} of its weight "
                         f"{tuple(W.shape)}, which has only {min(W.shape)} singular/QR directions; pick "
                         f"r <= {min(W.shape)} (for this module alone: rank_pattern={{{n!r}: {min(W.shape)}}})")
    f = initial_factors(W, A.size(0), m.scaling[name], init)
    return None if f is None else (f[0].to(W.dtype), f[1].to(W.dtype))


@register("pissa", PiSSAConfig, lr=1e-2,  # lastparam, 100 steps, val loss: 1e-2 2.22, 3e-3 2.56, 3e-2 2.78
          description="PiSSA: LoRA whose B A start as W0's top-r singular part; the rest of W0 is frozen")
def apply(model, config: PiSSAConfig) -> None:
    lora.apply(model, config)  # LoRA's layers and factors (A Kaiming-uniform, B = 0) ...
    initialize(model, config)  # ... then re-initialised, and W0 replaced by W_res


@register("olora", OLoRAConfig, lr=1e-2,  # lastparam, 100 steps, val loss: 1e-2 2.38, 3e-3 2.60
          description="OLoRA: LoRA whose B A start as the QR factors of W0's first r columns; the rest is frozen")
def apply_olora(model, config: OLoRAConfig) -> None:
    apply(model, config)


def initialize(model, config: PiSSAConfig) -> None:
    """Re-initialise adapter config.adapter_name in every module that has it: A0, B0 from W0, W0 <- W_res."""
    name, init, shared = config.adapter_name, config.init, _tied(model)
    with torch.no_grad():
        todo = [(n, m, _rounded_factors(n, m, name, init, m.base_layer.weight)) for n, m in adapted(model, name)]
        for n, m, factors in todo:  # every check before any write: a refused attach leaves each W0 as it was
            if factors is not None and id(m.base_layer.weight) in shared:
                raise ValueError(f"{n}.weight is tied to another module's weight (GPT-2 ties lm_head to wte); "
                                 f"{init} rewrites it into W_res, which would change both: leave {n} out of targets")
        for n, m, factors in todo:
            B, A = m.params(name)  # (d_out, r), (r, d_in)
            if init == "gaussian":
                nn.init.normal_(A, std=1 / A.size(0))  # PEFT: std 1/r; B stays 0
            if factors is not None:
                W = m.base_layer.weight  # W0 (d_out, d_in)
                B.copy_(factors[0]), A.copy_(factors[1])
                W.copy_(W.double() - m.scaling[name] * (B.double() @ A.double()))  # W_res, from the rounded B0, A0


def _tied(model) -> set[int]:
    seen, tied = set(), set()
    for _, p in model.named_parameters(remove_duplicate=False):
        (tied if id(p) in seen else seen).add(id(p))
    return tied


# ------------------------------------------------------------------------ back to a plain LoRA on W0
def to_lora(model, original) -> nn.Module:
    """The trained PiSSA/OLoRA adapter as a plain LoRA of rank 2r on the ORIGINAL weights W0 (PEFT's
    path_initial_model_for_weight_conversion):  W_res + s·BA = W0 − s·B0A0 + s·BA = W0 + s·[B, −B0] [A; A0].

    original: the base model the adapter was attached to, before attaching (W0; B0, A0 are recomputed from it).
    Returns a copy of `original` with LoRAConfig(r=2r, alpha=2·alpha (√2·alpha with rsLoRA): the same s)
    attached and those factors (and any trained biases) loaded; save it with minilora.save_adapter, load it
    onto the original base with minilora.load_adapter."""
    config = getattr(model, "minilora_config", None)
    if not isinstance(config, PiSSAConfig) or getattr(original, "minilora_config", None) is not None:
        raise ValueError("to_lora(model, original) needs a model with a PiSSA/OLoRA adapter attached and the "
                         "original base model with nothing attached")
    if any(m.merged for _, m in adapted(model, config.adapter_name)):
        raise ValueError("the adapter is merged into W_res; call minilora.unmerge(model) first")
    g = math.sqrt(2) if config.use_rslora else 2  # alpha/r = (g·alpha)/(2r), alpha/√r = (√2·alpha)/√(2r)
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(LoRAConfig)}
    plain = LoRAConfig(**{**fields, "r": 2 * config.r, "alpha": g * config.alpha,
                          "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},
                          "alpha_pattern": {k: g * v for k, v in config.alpha_pattern.items()}})
    out = attach(copy.deepcopy(original), plain)
    name = config.adapter_name
    with torch.no_grad():
        for n, m in adapted(model, name):
            B, A = m.params(name)  # (d_out, r), (r, d_in)
            W0 = out.get_submodule(n).base_layer.weight
            B0, A0 = _rounded_factors(n, m, name, config.init, W0) or (torch.zeros_like(B), torch.zeros_like(A))
            back = m.base_layer.weight.double() + m.scaling[name] * (B0.double() @ A0.double())  # W_res + s·B0A0
            if not torch.allclose(back, W0.double(), rtol=1e-4, atol=1e-4 * W0.abs().max().item()):
                raise ValueError(f"{n}: W_res + s·B0A0 is not the original's weight; pass the base model this "
                                 f"adapter was attached to (unmodified)")
            Bn, An = out.get_submodule(n).params(name)  # (d_out, 2r), (2r, d_in)
            Bn.copy_(torch.cat([B, -B0], 1)), An.copy_(torch.cat([A, A0], 0))
        trained = dict(model.named_parameters())
        for n, p in out.named_parameters():  # biases trained with bias="all" / "lora_only"
            if plain.trainable(n) and ".lora_" not in n:
                p.copy_(trained[n])
    return out


# ------------------------------------------------------------------------ QPiSSA: quantize W_res, not W0
def quantization_error(W: torch.Tensor, r: int, block_size: int = 64, double_quant: bool = False) -> dict:
    """NF4 error of QLoRA (quantize W0) and of QPiSSA (quantize W_res, keep B0A0 exact), in the nuclear norm as
    the authors' calculate_quantization_error.py (NF4 without double quantization by default, as there):

        QLoRA  ‖W0 − nf4(W0)‖_*      QPiSSA  ‖W0 − (nf4(W_res) + U_r S_r V_rᵀ)‖_* = ‖W_res − nf4(W_res)‖_*
        reduction = 1 − QPiSSA / QLoRA"""
    W = W.detach().float()
    B0, A0 = initial_factors(W, r, 1.0, "pissa")  # s = 1: B0A0 = U_r S_r V_rᵀ
    principal = (B0 @ A0).float()  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
    W_res = W - principal

    def nf4(w):
        return dequantize_nf4(quantize_nf4(w, block_size, double_quant)).float()

    qlora = torch.linalg.svdvals((W - nf4(W)).double()).sum().item()
    qpissa = torch.linalg.svdvals((W - (nf4(W_res) + principal)).double()).sum().item()
    return {"qlora": qlora, "qpissa": qpissa, "reduction": 1 - qpissa / qlora}
