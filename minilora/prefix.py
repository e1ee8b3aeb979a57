"""Prefix tuning: Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation",
arXiv 2101.00190.

Every attention layer l gets P trained key/value positions, placed before the sequence, that every
query may attend to:

    head_l(x) = softmax(q [K_l ; k]^T / sqrt(hs) + mask) [V_l ; v]      K_l, V_l (nh, P, hs)

where q, k, v come from x as usual and the mask is causal over the sequence and all-visible over the
P prefix positions. Nothing is prepended to the input itself: the tokens keep positions 0..T-1, and
an attention_mask (B, T) still works (the GPT's extra_kv path widens it by P visible positions).

All layers' K_l, V_l live in one matrix P_θ (P, L·2·C), layer-major, key then value. The paper finds
optimizing P_θ directly unstable, so it trains a reparameterization and keeps only its output:

    P_θ[i] = MLP_θ(P'_θ[i]),  P' (P, C),  MLP = Linear(C, hidden) -> tanh -> Linear(hidden, L·2·C)

fold_reparameterization(model) computes P_θ once and drops P' and the MLP: same logits, fewer tensors.

Trained: the prefix encoder (P' and the MLP; or P_θ itself when reparameterize=False or folded).
Frozen: the whole GPT.
Init: "random": P' (or P_θ) ~ N(0, 1), nn.Embedding's default, as Li & Liang's code and PEFT use.
    "vocab": P token ids sampled from the vocabulary; P' = their embeddings (wte rows), or, without
    the MLP, P_θ = the keys and values the frozen model computes for those tokens: the paper's
    "real words" init, which beats random init in low-data settings (Fig. 5).
Not identity at init: the prefix keys take attention weight from the sequence from the first step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .attach import MethodConfig, register, replace_module


@dataclass
class PrefixConfig(MethodConfig):
    num_virtual_tokens: int = 10  # P, prefix positions per layer (paper's default for table-to-text)
    reparameterize: bool = True  # train P' through an MLP (direct training is unstable); False: P_θ
    hidden: int = 512  # the MLP's hidden width (paper: 512 for table-to-text, 800 for summarization)
    init: str = "random"  # "random" (N(0, 1)) or "vocab" (from real tokens; see the module docstring)

    identity_at_init: ClassVar[bool] = False  # the prefix changes every layer's attention at once

    def trainable(self, name: str) -> bool:
        return ".prefix_encoder." in name


class PrefixEncoder(nn.Module):
    """Produces every layer's prefix keys and values, (L, 2, nh, P, hs). One instance is shared by
    the L PrefixAttention modules (PyTorch lists its parameters once, under layer 0's name)."""

    def __init__(self, n_layer, n_head, n_embd, num_virtual_tokens, reparameterize=True, hidden=512,
                 device=None, dtype=None):
        super().__init__()
        at = dict(device=device, dtype=dtype)  # the model's weights' device and dtype
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.num_virtual_tokens = num_virtual_tokens
        P, L, C = num_virtual_tokens, n_layer, n_embd
        if reparameterize:
            self.prefix_tokens = nn.Parameter(torch.randn(P, C, **at))  # P' (P, C)
            self.prefix_mlp = nn.Sequential(nn.Linear(C, hidden, **at), nn.Tanh(), nn.Linear(hidden, L * 2 * C, **at))
            self.register_parameter("prefix", None)
        else:
            self.prefix = nn.Parameter(torch.randn(P, L * 2 * C, **at))  # P_θ (P, L·2·C)
            self.prefix_tokens, self.prefix_mlp = None, None

    def forward(self):
        if self.prefix_mlp is not None:
            # (P, C) @ (C, hidden) -> tanh -> (P, hidden) @ (hidden, L·2·C) -> (P, L·2·C)
            prefix = self.prefix_mlp(self.prefix_tokens)
        else:
            prefix = self.prefix  # (P, L·2·C)
        P, L, nh = self.num_virtual_tokens, self.n_layer, self.n_head
        hs = self.n_embd // nh
        return prefix.view(P, L, 2, nh, hs).permute(1, 2, 3, 0, 4)  # (L, 2, nh, P, hs)

    @torch.no_grad()
    def fold_reparameterization(self):
        """P_θ = MLP(P'), computed once; P' and the MLP are dropped. Idempotent."""
        if self.prefix_mlp is None:
            return
        self.prefix = nn.Parameter(self.prefix_mlp(self.prefix_tokens))  # (P, L·2·C)
        self.prefix_tokens, self.prefix_mlp = None, None


class PrefixAttention(nn.Module):
    """Wraps layer `layer`'s attention: runs it with the prefix as extra keys/values."""

    def __init__(self, base: nn.Module, prefix_encoder: PrefixEncoder, layer: int):
        super().__init__()
        self.base = base  # the original CausalSelfAttention, frozen
        self.prefix_encoder = prefix_encoder  # shared by every layer
        self.layer = layer

    def forward(self, x, attention_mask=None):
        B = x.size(0)
        # the encoder runs in every layer: P rows, cheap next to attention over T positions
        kv = self.prefix_encoder()[self.layer]  # (2, nh, P, hs): this layer's K_l, V_l
        k, v = (t.unsqueeze(0).expand(B, -1, -1, -1) for t in kv)  # (B, nh, P, hs) each
        return self.base(x, extra_kv=(k, v), attention_mask=attention_mask)


def prefix_param_count(config: PrefixConfig, n_layer: int, n_embd: int) -> int:
    """Trainable parameters: P·C + (C·h + h) + (h·2LC + 2LC) with the MLP, P·2LC without."""
    P, L, C, h = config.num_virtual_tokens, n_layer, n_embd, config.hidden
    if not config.reparameterize:
        return P * 2 * L * C
    return P * C + (C * h + h) + (h * 2 * L * C + 2 * L * C)


@torch.no_grad()
def real_word_activations(model, ids: torch.Tensor) -> torch.Tensor:
    """The keys and values every layer of the (unwrapped) model computes for the tokens `ids` (P,),
    laid out as P_θ: (P, L·2·C). Li & Liang initialize the prefix with such activations."""
    P, C = ids.numel(), model.config.n_embd
    if P > model.config.block_size:
        raise ValueError(f"init='vocab' runs the model on P={P} tokens, more than block_size "
                         f"{model.config.block_size}; use init='random' or fewer virtual tokens")
    was_training = model.training
    model.eval()  # dropout off; restored below
    pos = torch.arange(P, device=ids.device)
    x = model.transformer.wte(ids[None]) + model.transformer.wpe(pos)  # (1, P, C)
    kvs = []
    for block in model.transformer.h:
        _, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)  # (1, P, C) @ (C, 3C) -> 3 x (1, P, C)
        kvs += [k, v]
        x = block(x)
    model.train(was_training)
    return torch.cat(kvs, dim=2)[0]  # (P, L·2·C)


@register("prefix", PrefixConfig, lr=1e-2, description="trained keys/values in every layer (Li & Liang 2021)")
def apply(model, config: PrefixConfig) -> None:
    if config.num_virtual_tokens < 0:
        raise ValueError(f"num_virtual_tokens={config.num_virtual_tokens}; use 0 or more")
    if config.init not in ("random", "vocab"):
        raise ValueError(f"init {config.init!r} is not supported; choose 'random' or 'vocab'")
    c = model.config
    w = model.transformer.wte.weight
    if config.init == "vocab":  # drawn first, so a seed fixes the tokens whatever the sizes
        ids = torch.randint(c.vocab_size, (config.num_virtual_tokens,)).to(w.device)
    encoder = PrefixEncoder(c.n_layer, c.n_head, c.n_embd, config.num_virtual_tokens,
                            config.reparameterize, config.hidden, device=w.device, dtype=w.dtype)
    if config.init == "vocab":
        with torch.no_grad():
            if config.reparameterize:
                encoder.prefix_tokens.copy_(model.transformer.wte(ids))  # P' = token embeddings
            else:
                encoder.prefix.copy_(real_word_activations(model, ids))  # P_θ = real-word K, V
    for i in range(c.n_layer):
        name = f"transformer.h.{i}.attn"
        replace_module(model, name, PrefixAttention(model.get_submodule(name), encoder, i))


def fold_reparameterization(model) -> None:
    """Drop the MLP for inference: store P_θ = MLP(P') and record reparameterize=False in the
    attached config, so save_adapter writes (and load_adapter restores) the folded prefix."""
    if not isinstance(getattr(model, "minilora_config", None), PrefixConfig):
        raise ValueError("fold_reparameterization needs a model with prefix tuning attached")
    for m in model.modules():
        if isinstance(m, PrefixEncoder):
            m.fold_reparameterization()
    model.minilora_config = dataclasses.replace(model.minilora_config, reparameterize=False)
