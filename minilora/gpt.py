"""The GPT every method in minilora fine-tunes: GPT-2 (Radford et al. 2019) in one file.

Read it top to bottom: config, attention, MLP, block, model, generation, loading and saving.
It knows nothing about fine-tuning methods; they attach by replacing its modules (see attach.py).

Shape letters, used in every file and lesson of minilora:
    B   batch size                    T   sequence length (tokens)
    C   embedding width (n_embd)      V   vocabulary size
    nh  number of heads               hs  head size, C // nh
    P   extra key/value positions (prefix tuning) or prompt vectors
    r   adapter rank                  d_in, d_out  input / output features of a linear layer

Module and parameter names are GPT-2's (transformer.wte, transformer.h.0.attn.c_attn, ...), and every
linear is an nn.Linear with an (out, in) weight, so a real GPT-2 checkpoint loads with only a transpose
and an adapter for these names means the same thing here and in PEFT on Hugging Face's GPT-2.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import CheckpointError, atomic_write_text, load_safetensors, read_json, save_safetensors


@dataclass
class GPTConfig:
    block_size: int = 128  # longest sequence the learned positions cover
    vocab_size: int = 4096  # minilora's BPE: 256 bytes + 3839 merges + <|endoftext|>
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # C, the residual-stream width
    dropout: float = 0.0  # on attention weights, residual branches and embeddings
    bias: bool = True  # GPT-2 has biases in every linear and LayerNorm
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"pick n_head from the divisors of n_embd")


# Named sizes: small by default, big by choice.
PRESETS = {
    "tiny": GPTConfig(),  # ~1.4M parameters: the embedded base, trains on 2 CPU cores
    "small": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),  # ~12M
    "gpt2": GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),  # 124M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, extra_kv=None, attention_mask=None):
        """x (B, T, C) -> (B, T, C).

        extra_kv: optional (k, v), each (B, nh, P, hs): keys/values every query may attend to, placed
            before the sequence (prefix tuning uses this path).
        attention_mask: optional (B, T) with 1 for real tokens and 0 for padding keys.
        """
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) @ (C, 3C) -> (B, T, 3C) -> 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0

        if extra_kv is None and attention_mask is None:
            # the common path: softmax(q k^T / sqrt(hs) + causal mask) v, fused by PyTorch
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            # the explicit path: build the boolean mask (True = may attend) by hand
            P = 0
            if extra_kv is not None:
                pk, pv = extra_kv  # (B, nh, P, hs) each
                P = pk.size(2)
                k = torch.cat([pk.to(k.dtype), k], dim=2)  # (B, nh, P + T, hs)
                v = torch.cat([pv.to(v.dtype), v], dim=2)  # (B, nh, P + T, hs)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
            mask = torch.cat([torch.ones(T, P, dtype=torch.bool, device=x.device), causal], dim=1)
            mask = mask.view(1, 1, T, P + T)  # every query sees all P extra positions
            if attention_mask is not None:
                keep = attention_mask.to(torch.bool)  # (B, T)
                keep = torch.cat([keep.new_ones(B, P), keep], dim=1)  # (B, P + T)
                mask = mask & keep.view(B, 1, 1, P + T)  # (B, 1, T, P + T)
                # a padded query that may see nothing would give NaN; let it see itself
                self_pos = torch.arange(T, device=x.device)
                mask = mask.clone()
                mask[..., self_pos, P + self_pos] = True
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C) @ (C, C) -> (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, C) @ (C, 4C) -> (B, T, 4C); GPT-2's GELU
        return self.dropout(self.c_proj(h))  # (B, T, 4C) @ (4C, C) -> (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attention_mask=None):
        if attention_mask is None:
            x = x + self.attn(self.ln_1(x))
        else:
            x = x + self.attn(self.ln_1(x), attention_mask=attention_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings (V, C)
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned positions (block_size, C)
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: the output layer reuses wte (V, C)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, trainable_only=False):
        """Parameters counted once (the tied lm_head is wte)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, idx, targets=None, attention_mask=None):
        """idx (B, T) token ids -> logits (B, T, V); with targets (B, T) also the mean cross-entropy
        over positions whose target is not -100. attention_mask (B, T): 1 = token, 0 = padding."""
        tok_emb = self.transformer.wte(idx)  # (B, T) -> (B, T, C)
        # positions are counted from the embeddings, so a module that prepends vectors to them works
        T = tok_emb.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} positions is longer than block_size "
                             f"{self.config.block_size}; crop the input or use a larger block_size")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(tok_emb + self.transformer.wpe(pos))  # (B, T, C) + (T, C)
        for block in self.transformer.h:
            x = block(x) if attention_mask is None else block(x, attention_mask=attention_mask)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, C) @ (C, V) -> (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, eos_id=None, generator=None):
        """Extend idx (B, T) by sampling max_new_tokens tokens. temperature=0 is greedy decoding;
        top_k keeps only the k most likely tokens; generation stops early once every row has
        produced eos_id (rows that finished keep receiving eos_id)."""
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]  # crop to the positions the model knows
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].float()  # (B, V): the next-token distribution
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            if eos_id is not None:
                nxt = nxt.masked_fill(done.view(-1, 1), eos_id)
                done |= nxt.view(-1) == eos_id
            idx = torch.cat([idx, nxt], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return idx

    # ---------------------------------------------------------------- loading and saving
    def save_pretrained(self, directory, hf=False):
        """Write config.json + model.safetensors, each file atomically: minilora's format, or with
        hf=True Hugging Face's GPT-2 format (transformers.GPT2LMHeadModel.from_pretrained reads it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}  # tied to wte
        if hf:
            state = {k.removeprefix("transformer."): (v.t() if k.endswith(_HF_TRANSPOSED) else v)
                     for k, v in state.items()}
            c = self.config
            config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                      "vocab_size": c.vocab_size, "n_positions": c.block_size, "n_embd": c.n_embd,
                      "n_layer": c.n_layer, "n_head": c.n_head, "layer_norm_epsilon": c.layer_norm_epsilon,
                      "activation_function": "gelu_new", "resid_pdrop": c.dropout,
                      "embd_pdrop": c.dropout, "attn_pdrop": c.dropout, "tie_word_embeddings": True,
                      "bos_token_id": c.vocab_size - 1, "eos_token_id": c.vocab_size - 1}
        else:
            config = {"minilora": 1, "model": asdict(self.config)}
        save_safetensors(state, directory / "model.safetensors", metadata={"format": "pt"})
        atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory, **overrides):
        """Load a minilora checkpoint directory or a Hugging Face GPT-2 directory (config.json +
        model.safetensors) from local disk, detecting which. Never downloads anything.
        overrides: GPTConfig fields to change, such as dropout."""
        directory = Path(directory)
        cfg_path, weights_path = directory / "config.json", directory / "model.safetensors"
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise CheckpointError(
                    f"{path} not found: a checkpoint directory needs config.json and model.safetensors "
                    f"(save one with GPT.save_pretrained, or copy a Hugging Face GPT-2 directory there)")
        raw = read_json(cfg_path)
        if "minilora" in raw and "model" in raw:
            config, hf = GPTConfig(**raw["model"]), False
        elif raw.get("model_type") == "gpt2" or "n_embd" in raw:
            config, hf = _config_from_hf(raw), True
        else:
            raise CheckpointError(f"{cfg_path} is neither a minilora config nor a GPT-2 config.json")
        known = {f.name for f in fields(GPTConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}; valid: {sorted(known)}")
        config = GPTConfig(**{**asdict(config), **overrides})
        state = load_safetensors(weights_path)
        if hf:
            state = _state_from_hf(state)
        model = cls(config)
        _load_exact(model, state, weights_path)
        return model


def _config_from_hf(raw):
    if raw.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"activation_function {raw['activation_function']!r} is not GPT-2's tanh GELU")
    return GPTConfig(block_size=raw.get("n_positions", 1024), vocab_size=raw["vocab_size"],
                     n_layer=raw["n_layer"], n_head=raw["n_head"], n_embd=raw["n_embd"],
                     dropout=0.0, bias=True, layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-5))


# Hugging Face's GPT-2 stores these as Conv1D weights of shape (in, out): transpose to nn.Linear's (out, in)
_HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _state_from_hf(state):
    out = {}
    for k, v in state.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")) or k == "lm_head.weight":
            continue  # causal-mask buffers, and the head tied to wte
        if k.endswith(_HF_TRANSPOSED):
            v = v.t().contiguous()
        out["transformer." + k] = v
    return out


def _load_exact(model, state, path):
    """Copy every tensor into the model, or say exactly which keys or shapes do not match."""
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, "
                              f"shape mismatches {wrong[:5]}")
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]})
