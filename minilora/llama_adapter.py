"""LLaMA-Adapter: Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention", arXiv 2303.16199.

The top L blocks each get K learned prompt vectors P_l (K, C). Their keys and values come from the
block's own frozen projections, and the queries of the sequence attend to them in a *separate*
softmax whose result is scaled by a gate tanh(g_l), one per head, initialized to 0 (paper eq. 7):

    S_p = q (P_l W_k)ᵀ / √hs   (B, nh, T, K)        S_t = q kᵀ / √hs + causal mask   (B, nh, T, T)
    y   = softmax(S_t) v  +  tanh(g_l) · softmax(S_p) (P_l W_v)                        (B, nh, T, hs)
    h   = W_o y + b_o  =  Attn(x)  +  W_o [tanh(g_l) · softmax(S_p) (P_l W_v)]

The second line is why minilora can wrap the attention instead of rewriting it: W_o is linear, so the
prompt's contribution is added after the frozen attention has run unchanged (AdaptedAttention.forward).
With one softmax over [prompt; tokens] (prefix tuning, lesson 02) the prompt would take attention weight
from the tokens from the first step; with a separate softmax and tanh(0) = 0 it starts at exactly zero.

Trained: adaption_prompt P_l (K, C) and adaption_gate g_l (nh,) of each adapted block (PEFT's names).
Frozen: the whole GPT, including the projections that turn P_l into keys and values.
Init: g_l = 0, so the model is the base model at step 0 ("zero-init attention", §3.2); P_l ~ N(0, 1)
    (PEFT's init). With g_l = 0 the prompts get no gradient on step 0, the gates do; from step 1 both train.
    `gate_init` ≠ 0 reproduces the paper's ablation with a non-zero (disturbing) start.
Defaults: K = 10 prompts in the top L = 30 of LLaMA-7B's 32 layers; here adapter_layers=None adapts all.
The registered lr 0.1 was the best of 3e-3, 1e-2, 3e-2, 0.1 in 120-step runs on the embedded task (the
paper uses 0.009 on LLaMA-7B).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attach import MethodConfig, register, replace_module


@dataclass
class LlamaAdapterConfig(MethodConfig):
    adapter_len: int = 10  # K, prompt vectors per adapted block (paper: 10)
    adapter_layers: int | None = None  # L, the top blocks that get prompts (paper: 30 of 32); None: all
    gate_init: float = 0.0  # g_l at init; 0 is the paper's zero-init attention (ablation: non-zero)

    identity_at_init: ClassVar[bool] = True  # holds for gate_init = 0 (tanh(0) = 0); see the docstring

    def trainable(self, name: str) -> bool:
        return name.endswith((".adaption_prompt", ".adaption_gate"))


class AdaptedAttention(nn.Module):
    """Wraps one block's CausalSelfAttention: the frozen attention, plus the gated prompt attention."""

    def __init__(self, base: nn.Module, adapter_len: int, gate_init: float = 0.0):
        super().__init__()
        self.base = base  # CausalSelfAttention, frozen
        C, nh = base.n_embd, base.n_head
        w = base.c_attn.weight
        self.adaption_prompt = nn.Parameter(torch.randn(adapter_len, C, device=w.device, dtype=w.dtype))  # P_l
        self.adaption_gate = nn.Parameter(torch.full((nh,), float(gate_init), device=w.device, dtype=w.dtype))

    def prompt_attention(self, x):
        """tanh(g) · softmax(q K_pᵀ/√hs) V_p, before W_o: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        nh, hs, K = self.base.n_head, C // self.base.n_head, self.adaption_prompt.size(0)
        W, b = self.base.c_attn.weight, self.base.c_attn.bias  # (3C, C), (3C,): q, k, v stacked
        q = F.linear(x, W[:C], None if b is None else b[:C])  # (B, T, C) @ (C, C) -> (B, T, C): W_q x
        _, kp, vp = F.linear(self.adaption_prompt, W, b).split(C, dim=1)  # (K, C) @ (C, 3C) -> 3 x (K, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        kp = kp.view(K, nh, hs).transpose(0, 1)  # (nh, K, hs)
        vp = vp.view(K, nh, hs).transpose(0, 1)  # (nh, K, hs)
        scores = q @ kp.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, hs) @ (nh, hs, K) -> (B, nh, T, K)
        y = scores.softmax(dim=-1) @ vp  # (B, nh, T, K) @ (nh, K, hs) -> (B, nh, T, hs): its own softmax
        y = torch.tanh(self.adaption_gate).view(1, nh, 1, 1) * y  # one gate per head (eq. 7)
        return y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C)

    def forward(self, x, attention_mask=None):
        # W_o is linear: W_o (y_t + y_p) + b_o = Attn(x) + W_o y_p (no second bias)
        out = self.base(x, attention_mask=attention_mask)  # (B, T, C), the frozen attention as it was
        return out + F.linear(self.prompt_attention(x), self.base.c_proj.weight)  # (B, T, C) @ (C, C)


@register("llama_adapter", LlamaAdapterConfig, lr=1e-1,
          description="LLaMA-Adapter: gated prompts with their own softmax in the top layers (Zhang et al. 2023)")
def apply(model, config: LlamaAdapterConfig) -> None:
    n_layer = len(model.transformer.h)
    L = n_layer if config.adapter_layers is None else config.adapter_layers
    if not 1 <= L <= n_layer or config.adapter_len < 1:
        raise ValueError(f"adapter_layers={config.adapter_layers}, adapter_len={config.adapter_len}: this model "
                         f"has {n_layer} blocks; pick adapter_layers in 1..{n_layer} (or None for all) and "
                         f"adapter_len ≥ 1")
    for i in range(n_layer - L, n_layer):  # the top L blocks
        name = f"transformer.h.{i}.attn"
        replace_module(model, name, AdaptedAttention(model.get_submodule(name), config.adapter_len, config.gate_init))
