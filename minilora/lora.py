"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv 2106.09685).

    h = W0 x + (alpha/r) · B A x        W0 (d_out, d_in), A (r, d_in), B (d_out, r), r << d_in, d_out

    x ──┬── W0 ─────────────────────────┐
        └── dropout ── A ── B ── ·alpha/r ──(+)── h

Trained: lora_A, lora_B of each adapted module (and biases with bias="all" or "lora_only").
Frozen: everything else, W0 included.
Init: A Kaiming-uniform(a=√5) as loralib and PEFT (the paper: Gaussian), B = 0, so ΔW = BA = 0 and step 0
    is exactly the base model; A ≠ 0 so that ∂L/∂B = (alpha/r)·g·(Ax)ᵀ is nonzero from the first step.
Scaling: alpha/r, so changing r needs no new learning rate (§4.1); rsLoRA (Kalajdzievski 2023,
    arXiv 2312.03732) uses alpha/√r, whose updates do not shrink as r grows.
Merge: W0 <- W0 + (alpha/r)·BA gives the same outputs with no extra latency (§4.1).
Names are PEFT's (base_layer, lora_A.<adapter>.weight), so adapter files go both ways (save_adapter).
"""
from __future__ import annotations

import dataclasses
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attach import (MethodConfig, attach, find_targets, mark_trainable, method_of, modules_take_the_mode, register,
                     replace_module)
from .checkpoint import CheckpointError

_QKV = ("q", "k", "v")  # the three thirds of GPT-2's fused c_attn output, in order


@dataclass
class LoRAConfig(MethodConfig):
    r: int = 8  # rank of BA (with fused_qkv: of each projection's own A, B pair)
    alpha: float = 16  # scaling = alpha / r (PEFT's lora_alpha)
    dropout: float = 0.0  # on the LoRA branch's input only (PEFT's lora_dropout)
    use_rslora: bool = False  # scaling = alpha / sqrt(r) instead
    targets: list[str] | str = field(default_factory=lambda: ["c_attn"])  # suffixes, a full-match regex or
    # "all-linear", as attach.find_targets; [] with embedding=True adapts the embedding only
    layers: list[int] | None = None  # only blocks transformer.h.<i> (PEFT's layers_to_transform)
    bias: str = "none"  # "none"; "all": every bias trains too; "lora_only": the adapted modules' biases
    rank_pattern: dict = field(default_factory=dict)  # {regex: r} per module: the first key that matches
    alpha_pattern: dict = field(default_factory=dict)  # the end of its name wins (PEFT's rule); {regex: alpha}
    embedding: bool = False  # also LoRA on transformer.wte: changes the lookup only, not the tied lm_head
    fused_qkv: list[str] | None = None  # e.g. ["q", "v"]: on c_attn, one A, B pair per listed third only
    adapter_name: str = "default"  # which named adapter of the model this config describes

    peft_type = "LORA"
    named_adapters: ClassVar[bool] = True  # whether lora.add_adapter can add more adapters of this config

    @classmethod
    def peft_match(cls, raw: dict) -> bool:
        # PEFT's DoRA files say LORA too, and so do PiSSA/OLoRA files (whose base is a residual: pissa.py)
        return not raw.get("use_dora") and not str(raw.get("init_lora_weights")).startswith(("pissa", "olora"))

    def __post_init__(self):
        if self.bias not in ("none", "all", "lora_only") or not set(self.fused_qkv or _QKV) <= set(_QKV):
            raise ValueError(f"bias={self.bias!r}, fused_qkv={self.fused_qkv!r}: bias is 'none', 'all' or "
                             f"'lora_only'; fused_qkv is None or a list of 'q', 'k', 'v'")

    def trainable(self, name: str) -> bool:
        own = re.search(rf"\.lora_(embedding_)?[AB]\.{re.escape(self.adapter_name)}(\.weight)?$", name)
        bias = {"all": ".bias", "lora_only": ".base_layer.bias"}.get(self.bias)
        return own is not None or (bias is not None and name.endswith(bias))

    def saved_key(self, name: str) -> str:  # PEFT drops the adapter name: lora_A.default.weight -> lora_A.weight
        own = rf"(\.lora_\w+)\.{re.escape(self.adapter_name)}(?=\.weight$|$)"
        return "base_model.model." + re.sub(own, r"\1", name)

    def rank_alpha(self, module: str) -> tuple[int, float]:
        return _pattern(self.rank_pattern, module, self.r), _pattern(self.alpha_pattern, module, self.alpha)

    # ---------------------------------------------------------------- the files PEFT reads
    def export_state(self, model, state):  # a fused c_attn is saved as PEFT's rank g·r LoRA (see _block)
        for key, parts in self._fused(model):
            state[key] = _block(state[key], parts)
        return state

    def import_state(self, model, state):
        for key, parts in self._fused(model):
            state[key] = _unblock(state[key], parts)
        return state

    def _fused(self, model):
        return [(self.saved_key(f"{n}.lora_B.{self.adapter_name}.weight"), m.parts[self.adapter_name])
                for n, m in _named_layers(model) if getattr(m, "parts", {}).get(self.adapter_name)]

    def to_json(self) -> dict:
        ours = {k: v for k, v in dataclasses.asdict(self).items() if k != "adapter_name"}
        return {"minilora_method": method_of(self), "minilora_config": ours, "peft_type": "LORA",
                "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True, "r": self.r,
                "lora_alpha": self.alpha, "lora_dropout": self.dropout, "use_rslora": self.use_rslora,
                "bias": self.bias, "init_lora_weights": True,
                "fan_in_fan_out": True,  # HF GPT-2's Conv1D holds W0 as (in, out); A and B keep their shapes
                **self._peft_targets(), **self._peft_patterns()}

    @classmethod
    def from_json(cls, raw: dict) -> "LoRAConfig":
        if "minilora_config" in raw:  # saved by minilora: our own fields, exactly
            return cls(**raw["minilora_config"])
        if unsupported := [k for k in ("use_dora", "lora_bias", "modules_to_save", "trainable_token_indices",
                                       "layer_replication", "target_parameters", "exclude_modules") if raw.get(k)]:
            raise CheckpointError(f"this PEFT adapter uses {unsupported}, which minilora's LoRA does not implement")
        targets, layers = raw.get("target_modules") or [], raw.get("layers_to_transform")
        is_wte = [t for t in targets if t == "wte" or t.endswith(".wte")] if isinstance(targets, list) else (
            targets != "all-linear" and re.fullmatch(targets, "transformer.wte"))
        return cls(r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
                   use_rslora=raw.get("use_rslora", False), bias=raw.get("bias", "none"), embedding=bool(is_wte),
                   targets=[t for t in targets if t not in is_wte] if isinstance(targets, list) else targets,
                   layers=[layers] if isinstance(layers, int) else layers,
                   rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {})

    def _peft_targets(self) -> dict:
        t, layers = self.targets, self.layers
        if isinstance(t, list) and (layers is None or not self.embedding):  # PEFT's list form
            return {"target_modules": t + ["wte"] * self.embedding, "layers_to_transform": layers,
                    "layers_pattern": None if layers is None else "h"}
        if t == "all-linear" and layers is None and not self.embedding:
            return {"target_modules": "all-linear"}
        # else one regex that PEFT full-matches: it takes no layers_to_transform with a regex, nor for wte
        body = (r"(?:.*\.)?(?:" + ("|".join(map(re.escape, t)) or "(?!)") + ")" if isinstance(t, list)
                else r".*\.(?:c_attn|c_proj|c_fc)" if t == "all-linear" else t)  # GPT-2's linears
        if layers is not None:
            body = rf"(?=.*\.h\.(?:{'|'.join(map(str, layers))})\.)(?:{body})"
        return {"target_modules": rf"(?:{body})|transformer\.wte" if self.embedding else body}

    def _peft_patterns(self) -> dict:
        rank, alpha = dict(self.rank_pattern), dict(self.alpha_pattern)
        if self.fused_qkv:  # PEFT sees a fused c_attn as rank g·r, with alpha such that its scaling is ours:
            g = len(self.fused_qkv)  # (g·alpha)/(g·r) = alpha/r, and with rsLoRA (√g·alpha)/√(g·r) = alpha/√r
            ga = math.sqrt(g) if self.use_rslora else g
            only = "(?=.*c_attn$)"  # these keys match c_attn modules only and come first, so they win
            rank = {**{f"{only}(?:{k})": g * v for k, v in rank.items()}, "c_attn": g * self.r, **rank}
            alpha = {**{f"{only}(?:{k})": ga * v for k, v in alpha.items()}, "c_attn": ga * self.alpha, **alpha}
        return {"rank_pattern": rank, "alpha_pattern": alpha}


def _pattern(patterns: dict, module: str, default):
    """PEFT's rank_pattern rule: the first key that, as a regex, matches the end of the module name."""
    return next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), default)


def _block(B, parts):
    """A fused c_attn's stacked B_j (g·C, r) -> the (3C, g·r) B of one rank g·r LoRA, PEFT's lora_B: the
    rows of projection parts[j] hold B_j in the columns that read A_j x; the other rows are 0."""
    g, r = len(parts), B.size(1)
    full = B.new_zeros(3, B.size(0) // g, g, r)  # (projection, row, pair, rank)
    full[parts, :, range(g)] = B.view(g, -1, r)  # projection parts[j], pair j <- B_j (C, r)
    return full.flatten(0, 1).flatten(1)  # (3C, g·r)


def _unblock(full, parts):
    """Inverse of _block: (3C, g·r) -> (g·C, r)."""
    g = len(parts)
    return full.view(3, full.size(0) // 3, g, -1)[parts, :, range(g)].flatten(0, 1)


class LoRALayer(nn.Module):
    """What LoRALinear and LoRAEmbedding share: named adapters, which one runs, merging."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer  # W0, frozen, under PEFT's name
        self.scaling: dict[str, float] = {}  # adapter -> alpha/r (or alpha/√r)
        self.active = "default"  # the adapter forward adds (set_adapter)
        self.merged: str | None = None  # the adapter folded into base_layer.weight, if any
        self.disabled = False  # disable_adapters(): base output only
        self.rows: list[str] | None = None  # adapter_rows(): an adapter name per batch row

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        y = self.base_layer(x)  # W0 x, or (W0 + ΔW) x while merged
        if self.rows is not None:  # mixed batch: row i gets adapter rows[i]
            if len(self.rows) != x.size(0):
                raise ValueError(f"adapter_rows names {len(self.rows)} rows but the batch has {x.size(0)}")
            for name in set(self.rows) & self.scaling.keys():  # "__base__" adds nothing
                idx = torch.tensor([i for i, n in enumerate(self.rows) if n == name], device=y.device)
                y = y.index_add(0, idx, self.update(x[idx], name))
            return y
        if self.disabled or self.merged or self.active not in self.scaling:
            return y
        return y + self.update(x, self.active)  # h = W0 x + (alpha/r) B A x

    def delta_weight(self, name: str) -> torch.Tensor:
        B, A = self.factors(name)
        return self.scaling[name] * (B @ A)  # (d_out, r) @ (r, d_in) -> (d_out, d_in)

    def merge(self):
        """W0 <- W0 + ΔW for the active adapter; idempotent (a second call does nothing)."""
        if self.merged or self.active not in self.scaling:
            return
        if self.disabled or self.rows is not None:
            raise ValueError("merge() inside disable_adapters() or adapter_rows(); leave the block first")
        delta = self.delta_weight(self.active)
        if not torch.isfinite(delta).all():
            raise ValueError(f"adapter {self.active!r}: its ΔW {tuple(delta.shape)} holds NaN or Inf, and merging "
                             f"would ruin the base weight; training diverged: lower the lr or load a good checkpoint")
        with torch.no_grad():
            self.base_layer.weight += delta.to(self.base_layer.weight.dtype)
        self.merged = self.active

    def unmerge(self):
        """W0 <- W0 − ΔW; idempotent; exact up to float rounding."""
        if self.merged:
            with torch.no_grad():
                self.base_layer.weight -= self.delta_weight(self.merged).to(self.base_layer.weight.dtype)
            self.merged = None

    def unload(self) -> nn.Module:
        return self.base_layer  # the plain module, ΔW in it if merged

    def remove(self, name: str):
        for d in (getattr(self, a) for a in self._per_adapter):
            if name in d:
                del d[name]


class LoRALinear(LoRALayer):
    """nn.Linear W0 (d_out, d_in) plus named adapters. With fused `parts` (GPT-2's c_attn, as loralib's
    MergedLinear(enable_lora=...)) each adapted third gets its own pair: q += (alpha/r) B_q A_q x, etc."""
    _per_adapter = ("lora_A", "lora_B", "lora_dropout", "parts", "scaling")

    def __init__(self, base_layer: nn.Linear):
        super().__init__(base_layer)
        self.lora_A, self.lora_B, self.lora_dropout = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.parts: dict[str, list[int] | None] = {}  # adapter -> thirds of c_attn it adapts (0 q, 1 k, 2 v)

    def add(self, name, r, alpha, use_rslora=False, dropout=0.0, parts=None):
        d_out, d_in = (w := self.base_layer.weight).shape
        g, C = (len(parts), d_out // 3) if parts else (1, d_out)  # g A, B pairs; each B writes C rows
        self.lora_A[name] = nn.Linear(d_in, g * r, bias=False, device=w.device, dtype=w.dtype)  # (g·r, d_in)
        self.lora_B[name] = nn.Linear(r, g * C, bias=False, device=w.device, dtype=w.dtype)  # (g·C, r)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)  # B = 0: ΔW = 0 at step 0
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / (math.sqrt(r) if use_rslora else r)
        self.parts[name] = parts

    def params(self, name):
        return self.lora_B[name].weight, self.lora_A[name].weight

    def factors(self, name):
        """(B, A) with ΔW = scaling · B A: B (d_out, g·r), A (g·r, d_in) (a fused B is _block's)."""
        B, A = self.params(name)
        return (_block(B, self.parts[name]) if self.parts[name] else B), A

    def update(self, x, name):
        B, A = self.factors(name)
        a = self.lora_dropout[name](x) @ A.T  # (B, T, d_in) @ (d_in, g·r) -> (B, T, g·r)
        return (a @ B.T) * self.scaling[name]  # (B, T, g·r) @ (g·r, d_out) -> (B, T, d_out)


class LoRAEmbedding(LoRALayer):
    """nn.Embedding W0 (V, C) plus LoRA on the lookup, as PEFT: token i's row gets (alpha/r)·(B A[:, i])ᵀ.
    PEFT's init: A = 0 (so ΔW = 0), B ~ N(0, 1). GPT-2 ties lm_head to wte; the update changes the lookup
    only, so the tied head keeps reading W0, and merge() is refused (it would change the head too)."""
    _per_adapter = ("lora_embedding_A", "lora_embedding_B", "scaling")

    def __init__(self, base_layer: nn.Embedding, tied: bool = False):
        super().__init__(base_layer)
        self.tied = tied
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()

    def add(self, name, r, alpha, use_rslora=False):
        V, C = (w := self.base_layer.weight).shape
        self.lora_embedding_A[name] = nn.Parameter(w.new_zeros(r, V))  # A (r, V)
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(C, r, device=w.device, dtype=w.dtype))  # (C, r)
        self.scaling[name] = alpha / (math.sqrt(r) if use_rslora else r)

    def params(self, name):
        return self.lora_embedding_B[name], self.lora_embedding_A[name]

    factors = params  # ΔW = scaling · B A (C, V): column i is token i's update

    def update(self, idx, name):
        B, A = self.factors(name)
        a = F.embedding(idx, A.T)  # (B, T) -> (B, T, r): column idx of A
        return (a @ B.T) * self.scaling[name]  # (B, T, r) @ (r, C) -> (B, T, C)

    def delta_weight(self, name):
        return super().delta_weight(name).T  # (C, V) -> (V, C), the table's orientation

    def merge(self):
        if self.tied and self.active in self.scaling and not self.merged:
            raise ValueError("wte is tied to lm_head: merging the embedding's LoRA would change the output layer "
                             "too; keep this adapter unmerged, or untie lm_head first")
        super().merge()


# ------------------------------------------------------------------------ attaching and managing adapters
def _named_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALayer)]


def _set(model, **attrs):  # the routing state every LoRA layer reads in forward
    for _, m in _named_layers(model):
        for k, v in attrs.items():
            setattr(m, k, v)


def _check(model, doing: str, names=()):
    have = getattr(model, "lora_configs", {})
    if unknown := sorted(set(names) - set(have)):
        raise ValueError(f"no adapter named {unknown}; this model has {sorted(have)}")
    if any(m.merged for _, m in _named_layers(model)):
        raise ValueError(f"cannot {doing} while an adapter is merged; call minilora.unmerge(model) first")


def _add(model, name: str, config: LoRAConfig):
    if name in model.lora_configs:
        raise ValueError(f"adapter {name!r} exists; delete_adapter it first or pick another name")
    linears = [] if config.embedding and not config.targets else [
        n for n in find_targets(model, config.targets, config.layers, kind=(nn.Linear, LoRALinear))
        if ".base_layer" not in n and ".lora_" not in n]  # not the insides of an existing LoRALinear
    for n in linears:
        if not isinstance(m := model.get_submodule(n), LoRALinear):
            replace_module(model, n, m := LoRALinear(m))
        parts = [_QKV.index(p) for p in _QKV if p in (config.fused_qkv or ())] if n.endswith("c_attn") else None
        m.add(name, *config.rank_alpha(n), config.use_rslora, config.dropout, parts or None)
    if config.embedding:
        if not isinstance(m := model.transformer.wte, LoRAEmbedding):
            tied = getattr(getattr(model, "lm_head", None), "weight", None) is m.weight
            replace_module(model, "transformer.wte", m := LoRAEmbedding(m, tied))
        m.add(name, *config.rank_alpha("transformer.wte"), config.use_rslora)
    model.lora_configs[name] = config


@register("lora", LoRAConfig, lr=1e-2, description="LoRA: trains low-rank B A beside frozen weights")
def apply(model, config: LoRAConfig) -> None:
    model.lora_configs = {}  # adapter name -> its LoRAConfig
    _add(model, config.adapter_name, config)
    _set(model, active=config.adapter_name)


def add_adapter(model, name: str, config: LoRAConfig):
    """Add adapter `name`: inactive and frozen, as in PEFT (on a model without LoRA: attach it)."""
    config = dataclasses.replace(config, adapter_name=name)
    if not config.named_adapters:  # e.g. PiSSA's init or LoRA-FA's seeded A run at attach, not here
        raise ValueError(f"{type(config).__name__} does not support add_adapter (it initializes at attach); "
                         f"attach it to a fresh model (minilora.attach) instead")
    if getattr(model, "minilora_config", None) is None:
        return attach(model, config)
    if not isinstance(model.minilora_config, LoRAConfig):
        raise ValueError(f"this model has {method_of(model.minilora_config)!r} attached, not LoRA")
    _check(model, "add an adapter")
    with modules_take_the_mode(model):
        _add(model, name, config)
    _set(model, active=model.minilora_config.adapter_name)  # new layers learn which adapter runs
    mark_trainable(model)
    return model


def set_adapter(model, name: str):
    """Make `name` the adapter that forward adds, that trains, merges, and that save_adapter writes."""
    _check(model, "switch adapters", [name])
    _set(model, active=name)
    model.minilora_config = model.lora_configs[name]
    mark_trainable(model)
    return model


def delete_adapter(model, name: str):
    _check(model, "delete an adapter", [name])
    if len(model.lora_configs) == 1:
        raise ValueError(f"{name!r} is the only adapter; use a fresh model (or merge_and_unload) instead")
    for _, m in _named_layers(model):
        m.remove(name)
    del model.lora_configs[name]
    if model.minilora_config.adapter_name == name:
        set_adapter(model, next(iter(model.lora_configs)))
    return model


@contextmanager
def _routing(model, **attrs):
    _set(model, **attrs)
    try:
        yield model
    finally:
        _set(model, disabled=False, rows=None)


def disable_adapters(model):
    """`with disable_adapters(model):` the base model: no LoRA update (biases trained with bias= stay)."""
    _check(model, "disable adapters")
    return _routing(model, disabled=True)


def adapter_rows(model, names: list[str]):
    """`with adapter_rows(model, ["a", "b", "__base__"]): model(idx)` runs adapter names[i] on row i (PEFT's
    adapter_names=; "__base__" is no adapter): each row equals running that adapter alone."""
    _check(model, "route rows to adapters", set(names) - {"__base__"})
    return _routing(model, rows=list(names))


def add_weighted_adapter(model, adapters: list[str], weights: list[float], name: str,
                         combination: str = "linear", r: int | None = None):
    """A new adapter `name` whose update is Σ_i w_i ΔW_i in every module (ΔW_i = s_i B_i A_i).

    linear: exact, by concatenation (PEFT's combination_type="cat"): A = [A_1; A_2; ...] (Σ r_i, d_in),
        B = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (d_out, Σ r_i), scaling 1. PEFT's "linear" instead sums the
        √(w s)-weighted A's and B's separately, whose product has cross terms B_i A_j: inexact for two or more.
    svd: Σ w_i ΔW_i re-factored to rank r (default: the largest rank among them), ranks may differ: the best
        rank-r approximation (Eckart-Young), exact when r reaches the rank of the sum."""
    _check(model, "combine adapters", adapters)
    if len(adapters) != len(weights) or combination not in ("linear", "svd"):
        raise ValueError(f"need one weight per adapter and combination 'linear' or 'svd', got {len(adapters)} "
                         f"adapters, {len(weights)} weights, {combination!r}")
    factors = {}
    with torch.no_grad():
        for n, m in _named_layers(model):
            if terms := [(w * m.scaling[a], *m.factors(a)) for a, w in zip(adapters, weights) if a in m.scaling]:
                if combination == "linear":
                    factors[n] = torch.cat([ws * B for ws, B, _ in terms], 1), torch.cat([A for *_, A in terms])
                else:
                    U, S, Vh = torch.linalg.svd(sum(ws * B @ A for ws, B, A in terms), full_matrices=False)
                    k = r or max(B.size(1) for _, B, _ in terms)  # Σ w ΔW (d_out, d_in) = U S Vh
                    factors[n] = U[:, :k] * S[:k], Vh[:k]  # B (d_out, k), A (k, d_in)
    ranks = {re.escape(n): B.size(1) for n, (B, _) in factors.items()}  # and alpha = r: scaling 1
    linears = [n for n in factors if isinstance(model.get_submodule(n), LoRALinear)]
    add_adapter(model, name, LoRAConfig(r=max(ranks.values()), alpha=max(ranks.values()), targets=linears,
                                        embedding=len(linears) < len(factors), rank_pattern=ranks,
                                        alpha_pattern=dict(ranks)))
    with torch.no_grad():
        for n, (B, A) in factors.items():
            for param, value in zip(model.get_submodule(n).params(name), (B, A)):
                param.copy_(value)
    return model
