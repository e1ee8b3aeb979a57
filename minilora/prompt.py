"""Prompt tuning: Lester, Al-Rfou, Constant 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning", arXiv 2104.08691; with the optional prompt encoder of P-tuning (Liu et al. 2021, "GPT
Understands, Too", arXiv 2103.10385).

P trained vectors θ_P (P, C) are prepended to the token embeddings and the frozen model reads the
longer sequence; the logits of the P prompt positions are dropped:

    X = [θ_P ; wte(idx)] + wpe(0 .. P+T-1)      (B, P + T, C)
    logits = lm_head(ln_f(blocks(X)))[:, P:]     (B, T, V), lined up with targets (B, T)

P-tuning computes the prompt instead as θ_P = encoder(E), E (P, C) trained, encoder an MLP or a
bidirectional LSTM followed by an MLP.

Attached by replacing modules: transformer.wte -> PromptEmbedding (prepends θ_P), lm_head ->
PromptHead (drops the first P positions), every attention -> PromptAttention (widens an
attention_mask (B, T) by P ones: the prompt is always visible). The wrappers hold the original wte
and lm_head, so the tie lm_head.weight is wte.weight stays intact.
Positions: the prompt takes positions 0..P-1 and the tokens P..P+T-1, so P + T must fit block_size:
inputs may have at most block_size - P tokens (PromptEmbedding raises a clear error otherwise).
generate() crops only to block_size and its last step reads all but the last sampled token, so keep
len(idx) + max_new_tokens - 1 <= block_size - P.

Trained: prompt_embeddings (P, C), plus prompt_encoder with encoder="mlp" or "lstm".
Frozen: the whole GPT, including wte and the tied lm_head.
Init: "vocab": wte rows of P token ids sampled uniformly (the paper samples among the 5,000 most
    common tokens); "random": U[-0.5, 0.5] (the paper's random init); "text": the embeddings of
    init_text's tokens, repeated or cropped to P (the paper's class-label init is of this kind).
    Paper, Fig. 3b: random < sampled vocab < class labels at small model sizes; no gap at 11B.
Not identity at init: the prompt changes every output from the first step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from .attach import MethodConfig, register, replace_module
from .tokenizer import get_tokenizer


@dataclass
class PromptConfig(MethodConfig):
    num_virtual_tokens: int = 20  # P (the paper: gains are marginal beyond 20)
    init: str = "vocab"  # "vocab", "random" or "text" (see the module docstring)
    init_text: str | None = None  # the text for init="text"
    tokenizer_name_or_path: str = "minilora"  # tokenizes init_text: "minilora", or a local GPT-2 dir
    encoder: str | None = None  # None (prompt tuning), "mlp" or "lstm" (P-tuning)
    encoder_hidden: int | None = None  # the encoder's hidden width; None: n_embd

    identity_at_init: ClassVar[bool] = False  # the prompt changes every output from step 0

    def trainable(self, name: str) -> bool:
        return ".prompt_" in name


class PromptEncoder(nn.Module):
    """P-tuning's encoder: E (P, C) -> θ_P (P, C), through an MLP, or a biLSTM and then the MLP."""

    def __init__(self, n_embd: int, hidden: int, kind: str, device=None, dtype=None):
        super().__init__()
        at = dict(device=device, dtype=dtype)  # the embedding's device and dtype
        self.lstm = (nn.LSTM(n_embd, hidden, bidirectional=True, batch_first=True, **at)
                     if kind == "lstm" else None)
        d_in = 2 * hidden if kind == "lstm" else n_embd  # the biLSTM concatenates both directions
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden, **at), nn.ReLU(), nn.Linear(hidden, n_embd, **at))

    def forward(self, e):  # e (P, C)
        if self.lstm is not None:
            e = self.lstm(e.unsqueeze(0))[0][0]  # (1, P, C) -> (1, P, 2·hidden) -> (P, 2·hidden)
        return self.mlp(e)  # (P, d_in) @ (d_in, hidden) -> ReLU -> @ (hidden, C) -> (P, C)


class PromptEmbedding(nn.Module):
    """Replaces transformer.wte: idx (B, T) -> [θ_P ; wte(idx)] (B, P + T, C)."""

    def __init__(self, base: nn.Embedding, num_virtual_tokens: int, block_size: int, encoder=None):
        super().__init__()
        self.base = base  # the original wte (V, C), frozen; lm_head's weight is its weight
        self.block_size = block_size
        w = base.weight  # created where the embedding table is, in its dtype
        self.prompt_embeddings = nn.Parameter(w.new_zeros(num_virtual_tokens, base.embedding_dim))  # (P, C)
        self.prompt_encoder = encoder

    def prompt(self):
        """θ_P (P, C)."""
        e = self.prompt_embeddings
        return e if self.prompt_encoder is None else self.prompt_encoder(e)

    def forward(self, idx):
        B, T = idx.shape
        P = self.prompt_embeddings.size(0)
        if P + T > self.block_size:
            raise ValueError(
                f"prompt tuning prepends P={P} vectors, so inputs may have at most block_size - P = "
                f"{self.block_size - P} tokens, got {T}; crop with idx[:, -{self.block_size - P}:] "
                f"(for generate(), keep len(idx) + max_new_tokens - 1 <= {self.block_size - P})")
        tok = self.base(idx)  # (B, T) -> (B, T, C)
        prompt = self.prompt().to(tok.dtype).unsqueeze(0).expand(B, -1, -1)  # (P, C) -> (B, P, C)
        return torch.cat([prompt, tok], dim=1)  # (B, P + T, C)


class PromptHead(nn.Module):
    """Replaces lm_head: drops the P prompt positions, so logits are (B, T, V) as without a prompt."""

    def __init__(self, base: nn.Linear, num_virtual_tokens: int):
        super().__init__()
        self.base = base  # the original lm_head, weight tied to wte
        self.num_virtual_tokens = num_virtual_tokens

    def forward(self, x):
        return self.base(x[:, self.num_virtual_tokens:])  # (B, T, C) @ (C, V) -> (B, T, V)


class PromptAttention(nn.Module):
    """Wraps an attention: an attention_mask (B, T) becomes (B, P + T) with the prompt visible."""

    def __init__(self, base: nn.Module, num_virtual_tokens: int):
        super().__init__()
        self.base = base
        self.num_virtual_tokens = num_virtual_tokens

    def forward(self, x, attention_mask=None):
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.size(0), self.num_virtual_tokens)  # (B, P)
            attention_mask = torch.cat([ones, attention_mask], dim=1)  # (B, P + T)
            return self.base(x, attention_mask=attention_mask)
        return self.base(x)


def prompt_param_count(config: PromptConfig, n_embd: int) -> int:
    """P·C, plus the encoder. MLP: C·h + h + h·C + C. LSTM: 2·(4h(C + h) + 8h) for its two
    directions (input and hidden weights of 4 gates, two bias vectors), then 2h·h + h + h·C + C."""
    P, C = config.num_virtual_tokens, n_embd
    h = config.encoder_hidden or C
    if config.encoder is None:
        return P * C
    if config.encoder == "mlp":
        return P * C + 2 * C * h + h + C
    return P * C + 2 * (4 * h * (C + h) + 8 * h) + 2 * h * h + h + h * C + C


def init_token_ids(config: PromptConfig, vocab_size: int) -> torch.Tensor:
    """The P token ids whose embeddings initialize the prompt (init="vocab" or "text")."""
    P = config.num_virtual_tokens
    if config.init == "vocab":
        return torch.randint(vocab_size, (P,))
    name = config.tokenizer_name_or_path
    enc = get_tokenizer("minilora") if name == "minilora" else get_tokenizer("gpt2", name)
    ids = enc.encode(config.init_text)
    if not ids or max(ids) >= vocab_size:
        raise ValueError(f"init_text {config.init_text!r} gives token ids {ids[:8]}, which do not fit this "
                         f"model's vocabulary of {vocab_size}; use the model's own tokenizer")
    ids = (ids * (P // len(ids) + 1))[:P]  # repeated, then cropped to P
    return torch.tensor(ids, dtype=torch.long)


@register("prompt", PromptConfig, lr=3e-2,
          description="trained input vectors before the tokens (Lester et al. 2021)")
def apply(model, config: PromptConfig) -> None:
    P, c = config.num_virtual_tokens, model.config
    if not 1 <= P < c.block_size:
        raise ValueError(f"num_virtual_tokens={P} does not fit: the prompt takes P of the block_size="
                         f"{c.block_size} positions, so pick P in 1..{c.block_size - 1}")
    if config.init not in ("vocab", "random", "text"):
        raise ValueError(f"init {config.init!r} is not supported; choose 'vocab', 'random' or 'text'")
    if (config.init == "text") != bool(config.init_text):
        raise ValueError("init='text' needs init_text=..., and init_text is only used with init='text'")
    if config.encoder not in (None, "mlp", "lstm"):
        raise ValueError(f"encoder {config.encoder!r} is not supported; choose None, 'mlp' or 'lstm'")
    wte = model.transformer.wte
    encoder = None
    if config.encoder is not None:
        encoder = PromptEncoder(c.n_embd, config.encoder_hidden or c.n_embd, config.encoder,
                                device=wte.weight.device, dtype=wte.weight.dtype)
    emb = PromptEmbedding(wte, P, c.block_size, encoder)
    with torch.no_grad():
        if config.init == "random":
            emb.prompt_embeddings.uniform_(-0.5, 0.5)
        else:
            ids = init_token_ids(config, c.vocab_size).to(wte.weight.device)
            emb.prompt_embeddings.copy_(wte(ids))  # (P,) -> (P, C)
    replace_module(model, "transformer.wte", emb)
    replace_module(model, "lm_head", PromptHead(model.lm_head, P))
    for i in range(c.n_layer):
        name = f"transformer.h.{i}.attn"
        replace_module(model, name, PromptAttention(model.get_submodule(name), P))
