"""LongLoRA: Chen et al. 2023, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models",
arXiv 2309.12307.

Extending a model's context means fine-tuning on long sequences, where attention costs O(T²). LongLoRA
trains with *shifted sparse attention* (S²-Attn) and attends fully again at inference:

    split the T positions into groups of G (G = T/4 in the official code); attention is causal *within*
    a group only: O(T·G) instead of O(T²).
    heads 0 .. nh/2−1 use groups [0, G), [G, 2G), ...;
    heads nh/2 .. nh−1 use groups shifted by G/2: [−G/2, G/2), [G/2, 3G/2), ...
    so information flows between neighbouring groups through the shifted half of the heads.

Plain LoRA on long sequences leaves a gap to full fine-tuning; the paper closes it by also training the
embeddings and the normalization layers ("LoRA+", §3.3), a few percent of the parameters.

Context extension: our GPT has learned absolute positions (wpe, block_size of them), not RoPE, so Position
Interpolation (Chen et al. 2023, arXiv 2306.15595) becomes interpolating the table: position j of the
extended model reads the old table at j/factor (linear between neighbours; the last factor−1 positions
repeat the last row). extend_context() does this before LoRA attaches.

Trained: LoRA's lora_A, lora_B (targets: q, k, v via c_attn and the attention's c_proj, as the paper
    adapts q, k, v, o), plus wte, wpe and every LayerNorm when train_embed_norm=True. The paper uses one
    learning rate for all of them (2e-5 on LLaMA); on this 1.3M-parameter model Adam at LoRA's 1e-2 (or even
    3e-3) wrecks the pretrained embeddings in a few dozen steps (held-out loss up from 4.27 to 4.5 at
    T = 256, measured while writing this file), so they get lr × embed_norm_lr_ratio (0.01) by default.
Frozen: the other weights.
Init: LoRA's (B = 0); positions interpolated. Not identity at init when context_factor > 1 (the
    interpolated positions differ from the learned ones); with factor 1 it is the base model.
Difference from the official code: it shifts with torch.roll, so the last shifted group wraps the
    sequence's last G/2 tokens around to its first G/2, and causal masking inside that group lets early
    tokens see late ones. Here the shifted heads pad G/2 empty positions at the front instead
    (s2_attention), so no token ever sees a later one.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import lora
from .attach import register, replace_module
from .lora import LoRAConfig


@dataclass
class LongLoRAConfig(LoRAConfig):
    """LoRAConfig's fields (r, alpha, dropout, targets, ...), plus:"""
    named_adapters: ClassVar[bool] = False  # initialized at attach: lora.add_adapter would skip that
    targets: list[str] | str = field(default_factory=lambda: ["c_attn", "attn.c_proj"])  # q, k, v and o
    context_factor: int = 2  # new block_size = factor × the base's, by position interpolation
    group_size_ratio: float = 0.25  # G = ratio · T in training (official: 1/4)
    shift: bool = True  # shift half the heads by G/2; False is the paper's "no shift" ablation
    s2_attn: bool = True  # False: full attention in training too (the baseline S²-Attn approximates)
    train_embed_norm: bool = True  # also train wte, wpe and the LayerNorms (the paper's LoRA+)
    embed_norm_lr_ratio: float = 0.01  # their lr = ratio × LoRA's (see the module docstring), no weight decay

    identity_at_init: ClassVar[bool] = False  # the interpolated positions change the outputs

    def __post_init__(self):
        super().__post_init__()
        if self.context_factor < 1 or not 0 < self.group_size_ratio <= 1:
            raise ValueError(f"context_factor={self.context_factor}, group_size_ratio={self.group_size_ratio}: "
                             f"the factor is an integer ≥ 1 and the ratio is in (0, 1]")

    def trainable(self, name: str) -> bool:
        embed_norm = name in ("transformer.wte.weight", "transformer.wpe.weight") or ".ln_" in name
        return super().trainable(name) or (self.train_embed_norm and embed_norm)

    def optimizer(self, model, lr, weight_decay):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        lora_params = [p for n, p in params if ".lora_" in n]
        others = [p for n, p in params if ".lora_" not in n]  # embeddings and norms (and LoRA biases)
        groups = [{"params": lora_params, "lr": lr, "weight_decay": weight_decay},
                  {"params": others, "lr": lr * self.embed_norm_lr_ratio, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))

    def to_json(self) -> dict:  # LoRA's minilora keys only, no PEFT ones: the file also holds embeddings and norms
        return {k: v for k, v in super().to_json().items() if k.startswith("minilora_")}


# ------------------------------------------------------------------------ position interpolation
@torch.no_grad()
def interpolate_positions(wpe: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C) -> (factor·N, C): row j = the old table at position j/factor, linearly interpolated."""
    N = wpe.size(0)
    pos = torch.arange(factor * N, device=wpe.device, dtype=torch.float64) / factor  # (fN,) in [0, N)
    lo = pos.floor().long().clamp(max=N - 1)
    hi = (lo + 1).clamp(max=N - 1)
    w = (pos - lo).clamp(max=1).to(wpe.dtype)[:, None]  # (fN, 1); 0 past the last row
    return (1 - w) * wpe[lo] + w * wpe[hi]  # (fN, C)


def extend_context(model, factor: int):
    """Give the model factor × its block_size positions by interpolating wpe (Position Interpolation)."""
    if factor == 1:
        return model
    old = model.transformer.wpe
    new = nn.Embedding(factor * old.num_embeddings, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    new.weight.data.copy_(interpolate_positions(old.weight, factor))
    model.transformer.wpe = new
    model.config = dataclasses.replace(model.config, block_size=factor * model.config.block_size)
    return model


# ------------------------------------------------------------------------ S²-Attn
def _grouped_causal(q, k, v, G: int, front: int):
    """Causal attention inside consecutive groups of G positions, after `front` empty positions are put
    before the sequence (front = G/2 gives the shifted groups). q, k, v (B, h, T, hs) -> (B, h, T, hs)."""
    B, h, T, hs = q.shape
    n = math.ceil((front + T) / G)  # groups
    back = n * G - front - T  # empty positions after the sequence, never seen by a real (earlier) query
    pad = lambda t: F.pad(t, (0, 0, front, back))  # (B, h, n·G, hs)
    q, k, v = (pad(t).view(B, h, n, G, hs) for t in (q, k, v))  # (B, h, n, G, hs)
    real = torch.zeros(n * G, dtype=torch.bool, device=q.device)
    real[front:front + T] = True
    causal = torch.ones(G, G, dtype=torch.bool, device=q.device).tril()  # (G, G)
    mask = causal & (real.view(n, 1, G) | torch.eye(G, dtype=torch.bool, device=q.device))  # (n, G, G)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # per group: (B, h, n, G, G) scores
    return y.reshape(B, h, n * G, hs)[:, :, front:front + T]  # drop the empty positions


def s2_attention(q, k, v, group_size: int, shift: bool = True):
    """Shifted sparse attention. q, k, v (B, nh, T, hs) -> (B, nh, T, hs). With group_size ≥ T there is
    one group and this is ordinary causal attention (no shift)."""
    T, nh = q.size(2), q.size(1)
    if group_size >= T:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if not shift or nh < 2:
        return _grouped_causal(q, k, v, group_size, 0)
    half = nh // 2
    return torch.cat([_grouped_causal(q[:, :half], k[:, :half], v[:, :half], group_size, 0),  # groups [0, G) ...
                      _grouped_causal(q[:, half:], k[:, half:], v[:, half:], group_size, group_size // 2)],
                     dim=1)  # the other heads: groups [−G/2, G/2), [G/2, 3G/2), ...


def s2_mask(T: int, group_size: int, shifted: bool) -> torch.Tensor:
    """(T, T) boolean: which key j query i may see under S²-Attn (for tests and plots)."""
    pos = torch.arange(T) + (group_size // 2 if shifted else 0)
    same = (pos[:, None] // group_size) == (pos[None, :] // group_size)
    return same & torch.ones(T, T, dtype=torch.bool).tril()


def attention_flops(T: int, C: int, group_size: int | None = None) -> int:
    """Multiply-adds ×2 of one layer's attention core (q kᵀ and weights · v), counting every score of a
    group (or of the full T × T matrix): 4·T·T·C full, 4·T·G·C with S²-Attn."""
    return 4 * T * min(T, group_size or T) * C


class S2Attention(nn.Module):
    """Wraps a CausalSelfAttention: S²-Attn while training, the wrapped full attention in eval mode."""

    def __init__(self, base: nn.Module, group_size_ratio: float, shift: bool = True):
        super().__init__()
        self.base = base  # CausalSelfAttention (its c_attn / c_proj may carry LoRA)
        self.group_size_ratio, self.shift = group_size_ratio, shift

    def forward(self, x, attention_mask=None):
        if not self.training:
            return self.base(x, attention_mask=attention_mask)  # full attention at inference
        if attention_mask is not None:
            raise ValueError("S²-Attn trains on unpadded windows; pass no attention_mask in training "
                             "(or use LongLoRAConfig(s2_attn=False))")
        B, T, C = x.shape
        nh, hs = self.base.n_head, C // self.base.n_head
        q, k, v = self.base.c_attn(x).split(C, dim=2)  # (B, T, C) @ (C, 3C) -> 3 x (B, T, C)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        G = max(1, round(self.group_size_ratio * T))
        y = s2_attention(q, k, v, G, self.shift).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.base.resid_dropout(self.base.c_proj(y))  # (B, T, C) @ (C, C) -> (B, T, C)


@register("longlora", LongLoRAConfig, lr=1e-2,
          description="LongLoRA: LoRA + embeddings/norms, S²-Attn in training, interpolated positions")
def apply(model, config: LongLoRAConfig) -> None:
    extend_context(model, config.context_factor)
    lora.apply(model, config)  # the LoRA layers (a LongLoRAConfig is a LoRAConfig)
    if config.s2_attn:
        for i, block in enumerate(model.transformer.h):
            replace_module(model, f"transformer.h.{i}.attn", S2Attention(block.attn, config.group_size_ratio, config.shift))
