"""Bottleneck adapters: Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP",
arXiv 1902.00751; the one-adapter-per-block variant of Pfeiffer et al. 2021 (AdapterFusion,
arXiv 2005.00247); the parallel form of He et al. 2022 ("Towards a Unified View of
Parameter-Efficient Transfer Learning", arXiv 2110.04366).

A small two-layer network with a skip connection, inserted after a sublayer's output:

    sequential (Houlsby, Pfeiffer):  h <- h + W_up f(W_down h)          h = sublayer(x)
    parallel   (He et al.):          h <- sublayer(x) + W_up f(W_down x)

with W_down (m, C), W_up (C, m), bottleneck m = C // reduction_factor, f = GELU or ReLU. The
output then goes through the block's own residual add, x + h. Placement "houlsby" puts one adapter
after the attention (after c_proj) and one after the MLP, as the paper does; "pfeiffer" only the one
after the MLP. Each adapter has 2·m·C + m + C parameters (two weights and two biases).

Trained: adapter_down, adapter_up of every adapter; with train_layernorms also every LayerNorm
    (ln_1, ln_2, ln_f), as Houlsby et al. train them.
Frozen: everything else, including wte and the tied lm_head (the paper trains a new task head;
    a language model has none).
Init: W_down ~ N(0, init_std²) truncated at ±2σ (the paper's near-identity init), b_down = 0;
    W_up = 0, b_up = 0, so W_up f(W_down h) = 0 and every adapter is exactly the identity at step 0
    (the paper draws W_up from the same small normal instead: near-identity, not exact). With
    W_up = 0, W_down gets a zero gradient at the first step; it learns from the second on.
Adapters have a nonlinearity between the projections, so they cannot be merged into the base
weights: they add latency at inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn as nn
import torch.nn.functional as F

from .attach import MethodConfig, register, replace_module


@dataclass
class AdapterConfig(MethodConfig):
    reduction_factor: int = 16  # m = C // reduction_factor (AdapterHub's default: 16)
    bottleneck: int | None = None  # m itself; overrides reduction_factor when set
    placement: str = "houlsby"  # "houlsby": after attn and after mlp; "pfeiffer": after mlp only
    parallel: bool = False  # He et al. 2022: adapter reads the sublayer's input, added to its output
    nonlinearity: str = "gelu"  # f: "gelu" or "relu"
    train_layernorms: bool = True  # Houlsby et al. also train the LayerNorms
    init_std: float = 1e-2  # std of W_down, truncated at 2σ (paper: 1e-2; larger degrades, Fig. 6)

    identity_at_init: ClassVar[bool] = True  # W_up = 0: the adapted model equals the base at step 0

    def trainable(self, name: str) -> bool:
        if ".adapter_" in name:
            return True
        return self.train_layernorms and ".ln_" in name  # ln_1, ln_2 of every block, and ln_f

    def bottleneck_size(self, n_embd: int) -> int:
        m = self.bottleneck if self.bottleneck is not None else n_embd // self.reduction_factor
        if m < 1:
            raise ValueError(f"bottleneck m = {n_embd} // reduction_factor {self.reduction_factor} = 0; "
                             f"pick reduction_factor <= {n_embd} or set bottleneck=")
        return m


@dataclass
class PfeifferConfig(AdapterConfig):
    """One adapter per block, after the MLP (Pfeiffer et al. 2021), with AdapterHub's defaults for it
    (reduction factor 16, ReLU). Only the adapters train, as with AdapterHub; the LayerNorms stay frozen."""
    placement: str = "pfeiffer"  # after mlp only
    nonlinearity: str = "relu"  # AdapterHub's Pfeiffer default
    train_layernorms: bool = False  # only the adapters train


class Adapter(nn.Module):
    """Wraps a sublayer (attn or mlp): returns sublayer(x) + W_up f(W_down ·), where · is the
    sublayer's output (sequential) or its input (parallel)."""

    def __init__(self, base: nn.Module, n_embd: int, bottleneck: int, nonlinearity="gelu",
                 parallel=False, init_std=1e-2):
        super().__init__()
        if nonlinearity not in ("gelu", "relu"):
            raise ValueError(f"nonlinearity {nonlinearity!r} is not supported; choose 'gelu' or 'relu'")
        self.base = base  # the original sublayer, frozen
        w = base.c_proj.weight  # the sublayer's output projection: the adapter lives where it does, in its dtype
        self.adapter_down = nn.Linear(n_embd, bottleneck, device=w.device, dtype=w.dtype)  # W_down (m, C)
        self.adapter_up = nn.Linear(bottleneck, n_embd, device=w.device, dtype=w.dtype)  # W_up (C, m)
        self.nonlinearity = nonlinearity
        self.parallel = parallel
        nn.init.trunc_normal_(self.adapter_down.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)  # W_up = 0: exact identity at step 0
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x, **kwargs):
        h = self.base(x, **kwargs)  # (B, T, C); kwargs: attention_mask for the attention
        a = x if self.parallel else h  # parallel: adapter reads the sublayer's input (He et al. 2022)
        z = self.adapter_down(a)  # (B, T, C) @ (C, m) -> (B, T, m)
        z = F.gelu(z) if self.nonlinearity == "gelu" else F.relu(z)  # f
        return h + self.adapter_up(z)  # h + (B, T, m) @ (m, C) -> (B, T, C)


def adapter_param_count(n_embd: int, bottleneck: int) -> int:
    """2·m·C + m + C: W_down and W_up (m·C each) and their biases (m and C)."""
    return 2 * bottleneck * n_embd + bottleneck + n_embd


def _apply(model, config: AdapterConfig) -> None:
    if config.placement not in ("houlsby", "pfeiffer"):
        raise ValueError(f"placement {config.placement!r} is not supported; choose 'houlsby' or 'pfeiffer'")
    C = model.config.n_embd
    m = config.bottleneck_size(C)
    sublayers = ("attn", "mlp") if config.placement == "houlsby" else ("mlp",)
    for i, block in enumerate(model.transformer.h):
        for sub in sublayers:
            adapter = Adapter(getattr(block, sub), C, m, config.nonlinearity, config.parallel,
                              config.init_std)
            replace_module(model, f"transformer.h.{i}.{sub}", adapter)


@register("houlsby", AdapterConfig, lr=1e-2,
          description="bottleneck adapters after attention and MLP (Houlsby et al. 2019)")
def apply(model, config: AdapterConfig) -> None:
    _apply(model, config)


@register("pfeiffer", PfeifferConfig, lr=1e-2,
          description="one bottleneck adapter after each MLP (Pfeiffer et al. 2021)")
def apply_pfeiffer(model, config: PfeifferConfig) -> None:
    _apply(model, config)
