"""What fine-tuning holds in memory, predicted in closed form and measured.

One training step of a GPT (config c, a batch of B sequences of T tokens) holds four kinds of tensors:

    weights      every parameter and buffer once (the tied lm_head is wte); an NF4 weight as its 4-bit
                 codes, absmax codes and nested scales (nf4.py)
    gradients    one per trainable parameter, in its dtype
    optimizer    AdamW: exp_avg and exp_avg_sq (the parameter's dtype) and a 4-byte `step` per trainable
                 tensor; plus a method's own per-step state (AdaLoRA's importance scores)
    activations  what autograd saves in forward for backward, at its peak (the end of forward). With
                 per-block activation checkpointing forward keeps each block's input, and a block's
                 activations come back while backward runs it again (checkpoint_peak)

`estimate(method, c, B, T)` computes all four from the config alone. The activations follow GPT.forward line
by line (`saved_tensors`): a LayerNorm keeps its input and two fp32 statistics per row, a matmul keeps its
input only when its weight trains, GELU keeps its input, the attention kernel keeps q, k, v (views of one
(B, T, 3C) tensor), its output and a log-sum-exp per row, the loss keeps fp32 log-probabilities. Whether an
op keeps anything depends on what needs a gradient: in LoRA's first block nothing does before the first
adapter, so ln_1 keeps nothing there. Tensors that are one storage (q, k, v; the attention output, which is
also c_proj's input) share one key, so each is counted once, as train.SavedTensorMeter counts storages.
LongLoRA's S²-Attn is the one attention that runs SDPA's math path (5-D grouped inputs): it keeps fp32 copies
of q, k, v and a (G, G) softmax per group instead (_s2_attention).

What each method adds is one entry of MEMORY ({"lora": _lora, ...}): a Plan naming what trains, what it adds
beside each linear, and what it changes in the model. `measure(model, B, T)` runs one step on the CPU and
counts the same four with train.tensor_memory and train.SavedTensorMeter; tests/test_memory.py checks
that the two agree for every registered method. On the CPU in one dtype they agree to the byte.

On a device, `measure_device(model, B, T, device, meter)` reads an allocator's counters around the forward, the
backward and the optimizer step: torch.cuda's on a GPU (`measure_cuda`), or those of `LiveBytes` on the CPU, a
stand-in that counts the live storages as CUDA's caching allocator counts its blocks (tests/test_memory.py runs
measure_cuda's own code on the CPU with it). `predict_cuda` says what they should read: the ends of the phases to
the byte, the peaks from the moments that make them (the logits and their gradients at the head, a block's widest
point, the optimizer's temporaries). The step keeps the loss and drops the logits, which no backward needs (as
train.py does); a loop that keeps them to the end of the step holds B·T·V·a more (predict_cuda's "logits").

Scope: dropout 0 (a dropout keeps a mask); one dtype for weights and activations, exact for fp32 (under CUDA
autocast the residual stream, LayerNorms and the loss stay fp32, and on the CPU a bf16 LayerNorm keeps bf16
statistics, so act_bytes=2 is an estimate). DoRA's cached ‖W0‖² rows (d_out fp32 per layer) are neither
parameters nor buffers and are not counted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils.checkpoint
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .attach import METHODS, find_targets
from .gpt import GPT, GPTConfig
from .lora import LoRAConfig
from .train import SavedTensorMeter, TrainConfig, TrainState, default_optimizer, tensor_memory

CATEGORIES = ("weights", "grads", "optimizer", "activations")


@dataclass
class Memory:
    """Bytes of one training step, by kind (estimated or measured)."""
    weights: int
    grads: int
    optimizer: int  # on the host with paged AdamW (optimizer_on_host)
    activations: int  # saved for backward, at their peak (with checkpointing: see checkpoint_peak)
    optimizer_on_host: bool = False
    detail: dict = field(default_factory=dict)  # activation terms {tensor: bytes}, or checkpointing's pieces
    inputs: tuple | None = field(default=None, repr=False, compare=False)  # estimate()'s arguments, for predict_cuda

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in CATEGORIES}


# ------------------------------------------------------------------------------ the GPT's own tensors
def linear_shapes(c: GPTConfig) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every nn.Linear of the GPT, by module name; lm_head (V, C) is wte's table."""
    C = c.n_embd
    shapes = {}
    for i in range(c.n_layer):
        h = f"transformer.h.{i}"
        shapes.update({f"{h}.attn.c_attn": (3 * C, C), f"{h}.attn.c_proj": (C, C),
                       f"{h}.mlp.c_fc": (4 * C, C), f"{h}.mlp.c_proj": (C, 4 * C)})
    shapes["lm_head"] = (c.vocab_size, C)
    return shapes


def gpt2_parameters(c: GPTConfig) -> dict[str, int]:
    """{name: numel} of GPT(c).named_parameters(), in closed form (lm_head is wte: not listed again)."""
    C, b = c.n_embd, c.bias
    p = {"transformer.wte.weight": c.vocab_size * C, "transformer.wpe.weight": c.block_size * C}
    shapes = linear_shapes(c)
    for i in range(c.n_layer):
        h = f"transformer.h.{i}"
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            d_out, d_in = shapes.get(f"{h}.{part}", (C, 1))  # a LayerNorm: weight (C,) and bias (C,)
            p[f"{h}.{part}.weight"] = d_out * d_in
            if b:
                p[f"{h}.{part}.bias"] = d_out
    p["transformer.ln_f.weight"] = C
    if b:
        p["transformer.ln_f.bias"] = C
    return p


def nf4_bytes(n: int, block_size: int = 64, double_quant: bool = True, block_size2: int = 256) -> int:
    """Bytes of an NF4Weight of n values, as nf4.quantize_nf4 stores it (qlora.Linear4bit's buffers)."""
    nb = math.ceil(n / block_size)  # level-1 blocks
    packed = math.ceil(n / 2)  # uint8, two 4-bit codes a byte
    if not double_quant:
        return packed + 4 * nb  # absmax c2: fp32 per block
    # absmax: uint8 per block; absmax_scale c1: fp32 per 256 blocks; absmax_offset: one fp32
    return packed + nb + 4 * math.ceil(nb / block_size2) + 4


# ------------------------------------------------------------------------------ what a method changes
@dataclass
class Adapters:
    sublayers: tuple  # ("attn", "mlp") for Houlsby, ("mlp",) for Pfeiffer
    m: int  # bottleneck
    nonlinearity: str  # "gelu" keeps its input and W_up keeps its output; "relu"'s output is both
    parallel: bool  # W_down reads the sublayer's input instead of its output


@dataclass
class Plan:
    """A method, as far as memory goes. Made by the method's entry in MEMORY from (GPTConfig, its config)."""
    trains: Callable[[str], bool] = lambda name: False  # which of the GPT's own parameters train (by name)
    new_trainable: list = field(default_factory=list)  # numel of each trainable tensor the method adds
    new_frozen: int = 0  # numel of frozen tensors it adds (LoRA-FA's A)
    branches: dict = field(default_factory=dict)  # adapted linear -> (kind, r, options), kind one of
    # "lora", "lora_fa", "dora", "adalora", "vera" (options: which of A, B, d, b train), "qa_lora" (options: g)
    quantized: dict = field(default_factory=dict)  # linear -> bytes of its frozen low-bit storage (QLoRA: NF4)
    prompt_attention: tuple | None = None  # LLaMA-Adapter: (adapted block indices, K prompts per block)
    adapters: Adapters | None = None  # bottleneck adapters after sublayers
    prefix: tuple | None = None  # (P, MLP hidden width or None): keys/values in every layer
    prompt: int = 0  # P vectors before the tokens: the blocks see P + T positions
    prompt_hidden: int | None = None  # P-tuning's MLP encoder width
    paged: bool = False  # PagedAdamW: the moments live in CPU memory
    context_factor: int = 1  # LongLoRA: wpe has factor × block_size rows (position interpolation)
    s2_attn: tuple | None = None  # LongLoRA's S²-Attn in training: (group_size_ratio, shift)
    method_state: Callable[[int], int] = lambda weight_bytes: 0  # per-step state a method's callbacks keep


def _unsupported(method, what):
    raise ValueError(f"memory.py has no formula for {method} with {what}; use the default, or add the term "
                     f"in minilora/memory.py (the method's entry in MEMORY)")


@functools.lru_cache(maxsize=8)
def _meta_gpt(key):
    with torch.device("meta"):  # no storage: only module names, for find_targets
        return GPT(GPTConfig(*key))


def _targets(c: GPTConfig, names, layers) -> list[str]:
    """The linears a config's targets select, by attach.find_targets' own rules (suffixes, regex, all-linear)."""
    return find_targets(_meta_gpt(dataclasses.astuple(c)), names, layers)


def _full(c, cfg) -> Plan:
    return Plan(trains=cfg.trainable)  # FullConfig's rule on the GPT's names (layers=: some blocks only)


def _lora(c, cfg, kind="lora", method="lora") -> Plan:
    if not isinstance(cfg, LoRAConfig):
        raise ValueError(f"memory.py's {method} entry reads a LoRAConfig (r, targets, layers), got "
                         f"{type(cfg).__name__}; give the method its own entry in minilora/memory.py::MEMORY")
    for what, bad in (("dropout > 0", cfg.dropout > 0), ("embedding=True", cfg.embedding),
                      ("fused_qkv", cfg.fused_qkv), (f"bias={cfg.bias!r}", cfg.bias != "none"),
                      ("detach_norm=False", not getattr(cfg, "detach_norm", True))):
        if bad:
            _unsupported(method, what)
    shapes, plan = linear_shapes(c), Plan()
    g = getattr(cfg, "group_size", None) if kind == "qa_lora" else None
    for n in _targets(c, cfg.targets, cfg.layers) if cfg.targets else []:
        (d_out, d_in), r = shapes[n], cfg.rank_alpha(n)[0]
        plan.branches[n] = (kind, r, g)
        if kind == "lora_fa":  # A (r, d_in) frozen at its random init: a weight, no gradient, no moments
            plan.new_frozen += r * d_in
            plan.new_trainable += [d_out * r]  # lora_B
        elif kind == "qa_lora":  # A (r, d_in/g) on the pooled input; the base: uint8 codes, fp32 α and β per group
            plan.new_trainable += [r * (d_in // g), d_out * r]
            plan.quantized[n] = d_out * d_in + 2 * 4 * d_out * (d_in // g)
        else:
            plan.new_trainable += [r * d_in, d_out * r] + [d_out] * (kind == "dora")  # A, B (, magnitude m)
    if "lm_head" in plan.quantized:
        _unsupported(method, "lm_head in targets (it is wte's table)")
    return plan


def _qlora(c, cfg, kind="lora", method="qlora") -> Plan:
    plan = _lora(c, cfg, kind, method)
    if "lm_head" in plan.branches:
        _unsupported(method, "lm_head in targets (it is wte's table)")
    shapes = linear_shapes(c)
    plan.quantized = {n: nf4_bytes(math.prod(shapes[n]), cfg.block_size, cfg.double_quant) for n in plan.branches}
    plan.paged = cfg.paged_optimizer
    return plan


def _adalora(c, cfg) -> Plan:
    if cfg.dropout > 0:
        _unsupported("adalora", "dropout > 0")
    shapes, plan = linear_shapes(c), Plan()
    for n in _targets(c, cfg.targets, cfg.layers):
        (d_out, d_in), r = shapes[n], cfg.rank_pattern.get(n, cfg.init_r)
        plan.branches[n] = ("adalora", r, None)
        plan.new_trainable += [r * d_in, r, d_out * r]  # Q = lora_A, λ = lora_E, P = lora_B
    n_train, ranks = sum(plan.new_trainable), sum(r for _, r, _ in plan.branches.values())
    allocating = not cfg.rank_pattern  # RankAllocator keeps scores until it has shrunk the ranks
    # Ī and Ū fp32 per trainable entry, a copy of each gradient, a bool keep-mask per triplet
    plan.method_state = lambda wb: ranks + allocating * n_train * (2 * 4 + wb)
    return plan


def _vera(c, cfg, method="vera") -> Plan:
    """VeRA and Tied-LoRA (vera.py): h += Λ_b B Λ_d A x, one A, B pair shared by a group of layers (VeRA: all of
    them), sized to the group's largest (d_out, d_in); which of A, B, d, b train is the config's."""
    if not hasattr(cfg, "group") or cfg.dropout > 0:
        _unsupported(method, "this config (not vera.py's, or dropout > 0)")
    shapes, plan, groups = linear_shapes(c), Plan(), {}
    flags = (cfg.train_A, cfg.train_B, cfg.train_d, cfg.train_b)
    for n in _targets(c, cfg.targets, cfg.layers):
        d_out, d_in = shapes[n]
        plan.branches[n] = ("vera", cfg.r, flags)
        for trains, numel in ((cfg.train_d, cfg.r), (cfg.train_b, d_out)):  # d (r,), b (d_out,): Parameters
            plan.new_trainable += [numel] * trains
            plan.new_frozen += numel * (not trains)
        shape = groups.setdefault(cfg.group(n), [0, 0])
        shape[:] = max(shape[0], d_out), max(shape[1], d_in)
    for d_out, d_in in groups.values():  # A (r, d_in), B (d_out, r); a frozen one is a buffer, a weight all the same
        for trains, numel in ((cfg.train_A, cfg.r * d_in), (cfg.train_B, d_out * cfg.r)):
            plan.new_trainable += [numel] * trains
            plan.new_frozen += numel * (not trains)
    return plan


def _longlora(c, cfg) -> Plan:
    """LongLoRA (longlora.py): LoRA's branches, plus wte, wpe and the LayerNorms with train_embed_norm
    (LongLoRAConfig.trainable), a position table of context_factor × block_size rows, and S²-Attn in
    training. Its AdamW has two param groups: the same state per tensor as one."""
    plan = _lora(c, cfg, method="longlora")
    plan.trains, plan.context_factor = cfg.trainable, cfg.context_factor  # lora_* are not GPT names: base ones only
    plan.s2_attn = (cfg.group_size_ratio, cfg.shift) if cfg.s2_attn else None
    return plan


def _llama_adapter(c, cfg) -> Plan:
    L = c.n_layer if cfg.adapter_layers is None else cfg.adapter_layers
    K = cfg.adapter_len
    return Plan(new_trainable=[K * c.n_embd, c.n_head] * L,  # adaption_prompt (K, C), adaption_gate (nh,)
                prompt_attention=(set(range(c.n_layer - L, c.n_layer)), K))


def _adapters(c, cfg) -> Plan:
    if cfg.placement not in ("houlsby", "pfeiffer"):
        _unsupported("adapters", f"placement={cfg.placement!r}")
    C, m = c.n_embd, cfg.bottleneck_size(c.n_embd)
    subs = ("attn", "mlp") if cfg.placement == "houlsby" else ("mlp",)
    new = [m * C, m, C * m, C] * (c.n_layer * len(subs))  # W_down (m, C), b_down, W_up (C, m), b_up
    return Plan(trains=cfg.trainable, new_trainable=new,  # AdapterConfig's rule: LayerNorms with train_layernorms
                adapters=Adapters(subs, m, cfg.nonlinearity, cfg.parallel))


def _prefix(c, cfg) -> Plan:
    P, L, C, h = cfg.num_virtual_tokens, c.n_layer, c.n_embd, cfg.hidden
    if cfg.reparameterize:  # P' (P, C), Linear(C, h), Linear(h, 2LC)
        new = [P * C, C * h, h, h * 2 * L * C, 2 * L * C]
    else:
        new = [P * 2 * L * C]  # P_θ itself
    return Plan(new_trainable=new, prefix=(P, h if cfg.reparameterize else None))


def _prompt(c, cfg) -> Plan:
    P, C = cfg.num_virtual_tokens, c.n_embd
    h = cfg.encoder_hidden or C
    if cfg.encoder not in (None, "mlp"):
        _unsupported("prompt", f"encoder={cfg.encoder!r}")
    new = [P * C] + ([C * h, h, h * C, C] if cfg.encoder == "mlp" else [])  # θ_P (, its MLP)
    return Plan(new_trainable=new, prompt=P, prompt_hidden=h if cfg.encoder == "mlp" else None)


# One entry per method name. A new method adds its line here (and tests/test_memory.py checks it).
MEMORY: dict[str, Callable[[GPTConfig, object], Plan]] = {
    "full": _full,
    "lora": _lora,
    "lora_plus": functools.partial(_lora, method="lora_plus"),  # LoRA+ changes learning rates, not tensors
    "lora_fa": functools.partial(_lora, kind="lora_fa", method="lora_fa"),  # A frozen (LoRA-FA, 2308.03303)
    "pissa": functools.partial(_lora, method="pissa"),  # PiSSA, OLoRA: LoRA's tensors, another init (W_res for W0)
    "olora": functools.partial(_lora, method="olora"),
    "dora": functools.partial(_lora, kind="dora", method="dora"),
    "qlora": _qlora,
    "qdora": functools.partial(_qlora, kind="dora", method="qdora"),
    "loftq": functools.partial(_qlora, method="loftq"),  # QLoRA's storage (2-bit codes too: one per nibble)
    "qa_lora": functools.partial(_lora, kind="qa_lora", method="qa_lora"),
    "vera": _vera,
    "tied_lora": functools.partial(_vera, method="tied_lora"),
    "llama_adapter": _llama_adapter,
    "longlora": _longlora,
    "adalora": _adalora,
    "houlsby": _adapters,
    "pfeiffer": _adapters,
    "prefix": _prefix,
    "prompt": _prompt,
}


def plan_for(method: str, c: GPTConfig, config=None) -> Plan:
    if method not in MEMORY:
        raise ValueError(f"minilora/memory.py has no entry for method {method!r}: add one to MEMORY there "
                         f"(entries: {sorted(MEMORY)})")
    if config is None:
        if method not in METHODS:
            raise ValueError(f"{method!r} is not registered (import its module first) and no config was given")
        config = METHODS[method].config_cls()
    return MEMORY[method](c, config)


# ------------------------------------------------------------------------------ activations, following GPT.forward
def saved_tensors(c: GPTConfig, B: int, T: int, plan: Plan, act_bytes: int = 4) -> dict[str, int]:
    """{tensor: bytes} autograd keeps after one forward of B sequences of T tokens (no checkpointing)."""
    a, C, V, P = act_bytes, c.n_embd, c.vocab_size, plan.prompt
    Tx = P + T  # positions the blocks see (prompt tuning prepends P)
    if Tx > c.block_size:
        raise ValueError(f"{P} prompt positions + T={T} tokens exceed block_size {c.block_size}; lower T")
    S = {}
    # x = wte(idx) + wpe(pos): an embedding keeps its int64 indices when its table trains
    if plan.trains("transformer.wte.weight"):
        S["idx"] = 8 * B * T  # (B, T)
    if plan.trains("transformer.wpe.weight"):
        S["pos"] = 8 * Tx  # (T,)
    if plan.prompt_hidden:  # P-tuning's encoder: ReLU's output (P, h), which the second Linear keeps too
        S["prompt_encoder.relu"] = P * plan.prompt_hidden * a
    g = bool(S) or P > 0  # does the residual stream need a gradient yet?
    for i in range(c.n_layer):
        g = _block(S, c, B, Tx, i, g, plan, a)
    x = B * Tx * C * a  # one (B, P + T, C) tensor
    g = _layernorm(S, "transformer.ln_f", "ln_f.in", x, B * Tx, g, plan)
    # lm_head: (B, T, C) @ (C, V); a prompt's positions are dropped by a view, the (B, P + T, C) storage stays
    _linear(S, plan, "lm_head", "ln_f.out", x, B * T, C, V, g, a)
    # loss: cross_entropy(logits.float()) keeps the fp32 log-probabilities (B·T, V), the targets, a total weight
    S.update({"loss.log_softmax": B * T * V * 4, "loss.targets": 8 * B * T, "loss.total_weight": 4})
    return S


def _block(S, c, B, T, i, g, plan, a) -> bool:
    """Block i: x + attn(ln_1(x)), then x + mlp(ln_2(x)). g: whether x needs a gradient; returns the output's."""
    C, BT, h = c.n_embd, B * T, f"transformer.h.{i}"
    x = BT * C * a  # bytes of one (B, T, C) tensor
    g1 = _layernorm(S, f"{h}.ln_1", f"{h}.x", x, BT, g, plan)
    gq = _linear(S, plan, f"{h}.attn.c_attn", f"{h}.ln_1.out", x, BT, C, 3 * C, g1, a)  # (B, T, C) -> (B, T, 3C)
    gy = _attention(S, c, B, T, h, gq, plan, a)
    go = _linear(S, plan, f"{h}.attn.c_proj", f"{h}.attn.y", x, BT, C, C, gy, a)  # the attention output y
    go = _prompt_attention(S, c, B, T, i, h, plan, g1, a) or go
    go = _adapter(S, plan, h, "attn", f"{h}.ln_1.out", x, BT, go, a)
    g = g or go  # x + attn(ln_1(x))
    g2 = _layernorm(S, f"{h}.ln_2", f"{h}.x2", x, BT, g, plan)
    gf = _linear(S, plan, f"{h}.mlp.c_fc", f"{h}.ln_2.out", x, BT, C, 4 * C, g2, a)  # (B, T, C) -> (B, T, 4C)
    if gf:
        S[f"{h}.mlp.c_fc.out"] = 4 * x  # GELU keeps its input (B, T, 4C)
    gm = _linear(S, plan, f"{h}.mlp.c_proj", f"{h}.mlp.gelu", 4 * x, BT, 4 * C, C, gf, a)  # (B, T, 4C) -> (B, T, C)
    gm = _adapter(S, plan, h, "mlp", f"{h}.ln_2.out", x, BT, gm, a)
    return g or gm  # x + mlp(ln_2(x))


def _layernorm(S, name, x_key, x, BT, g, plan) -> bool:
    """A LayerNorm with a backward keeps its input and mean, rstd (B, T, 1) fp32: whenever x needs a gradient
    or its own weight or bias trains (Houlsby trains them, so even block 0's ln_1 keeps x)."""
    if g or plan.trains(f"{name}.weight") or plan.trains(f"{name}.bias"):
        S[x_key] = x
        S[f"{name}.mean_rstd"] = 2 * BT * 4
        return True
    return False


def _linear(S, plan, name, x_key, x, BT, d_in, d_out, g, a) -> bool:
    """y = x Wᵀ + b, plus the method's branch. The matmul keeps x only when W trains (∂L/∂W = gᵀ x); a frozen W
    (dense, or qlora.Linear4bit's 4-bit buffers) keeps no activation. Returns whether y needs a gradient."""
    w = "transformer.wte.weight" if name == "lm_head" else f"{name}.weight"  # lm_head is tied to wte
    if plan.trains(w):
        S[x_key] = x
    out = g or plan.trains(w) or plan.trains(f"{name}.bias")
    if name in plan.branches:
        _branch(S, name, *plan.branches[name], x_key, x, BT, d_in, d_out, g, a)
        out = True
    return out


def _branch(S, name, kind, r, opt, x_key, x, BT, d_in, d_out, g, a):
    """What an adapted linear's branch keeps. A product keeps each factor for the other's gradient, so a frozen
    factor's partner is not kept: LoRA's x Aᵀ keeps x for ∂L/∂A, LoRA-FA's (A frozen) does not."""
    if kind == "vera":  # a = (x Aᵀ) ⊙ d, then (a Bᵀ) ⊙ b, A and B shared; opt: which of A, B, d, b train
        train_A, train_B, train_d, train_b = opt
        if train_A:
            S[x_key] = x
        if train_d:
            S[f"{name}.vera_xA"] = BT * r * a  # x Aᵀ (B, T, r), for ∂L/∂d
        if train_B:
            S[f"{name}.vera_a"] = BT * r * a  # a (B, T, r), for ∂L/∂B
        if train_b:
            S[f"{name}.vera_aB"] = BT * d_out * a  # a Bᵀ (B, T, d_out), for ∂L/∂b
        return
    if kind == "qa_lora":  # A reads pool(x), the sum over each group of g inputs: a new (B, T, d_in/g) tensor
        S[f"{name}.qa_pooled"] = BT * (d_in // opt) * a
    elif kind != "lora_fa":  # a = x Aᵀ keeps x for ∂L/∂A; LoRA-FA's frozen A needs no x, only a
        S[x_key] = x
    S[f"{name}.lora_a"] = BT * r * a  # a (B, T, r), kept by a Bᵀ for ∂L/∂B
    if kind == "adalora" and g:  # x (ΛQ)ᵀ: the product ΛQ (r, d_in) is kept for ∂L/∂x
        S[f"{name}.lora_EA"] = r * d_in * a
    if kind == "dora":  # f ⊙ z: z = W0 x + b + s·BAx (B, T, d_out) for ∂L/∂m; f = m/‖W0 + sBA‖ for ∂L/∂z
        S[f"{name}.dora_z"] = BT * d_out * a
        S[f"{name}.dora_f"] = d_out * a
        S[f"{name}.dora_norm"] = d_out * 4  # the fp32 norm, kept by m / norm


def _attention(S, c, B, T, h, g, plan, a) -> bool:
    """F.scaled_dot_product_attention keeps q, k, v, its output y (B, nh, T, hs) and the log-sum-exp of each
    row (B, nh, T) fp32. q, k, v are views of c_attn's (B, T, 3C) output: that one tensor is what stays."""
    C, nh = c.n_embd, c.n_head
    if plan.prefix is None and not g:
        return False
    if plan.s2_attn is not None and max(1, round(plan.s2_attn[0] * T)) < T:  # G ≥ T: plain causal SDPA
        _s2_attention(S, c, B, T, h, plan, a)
        return True
    S[f"{h}.attn.qkv"] = 3 * B * T * C * a
    S[f"{h}.attn.y"] = B * T * C * a  # also attn.c_proj's input: one tensor
    S[f"{h}.attn.lse"] = B * nh * T * 4
    if plan.prefix is not None:  # prefix tuning: k, v = [K_l ; k], [V_l ; v], new (B, nh, P + T, hs) tensors
        P, hidden = plan.prefix
        S[f"{h}.attn.prefix_k"] = S[f"{h}.attn.prefix_v"] = B * (P + T) * C * a
        S[f"{h}.attn.mask"] = T * (P + T) * a  # the (1, 1, T, P + T) mask, as the float mask the kernel keeps
        if hidden:  # the encoder runs in every layer: tanh's output (P, hidden), which the 2nd Linear keeps too
            S[f"{h}.attn.prefix_tanh"] = P * hidden * a
    return True


def _s2_attention(S, c, B, T, h, plan, a):
    """LongLoRA's S²-Attn (longlora.py::s2_attention): per half of the heads (one group of nh heads without
    shift), _grouped_causal pads q, k, v with `front` empty positions before and the rest of the last group
    after, into new (B, h, n·G, hs) tensors (n = ⌈(front + T)/G⌉ groups), viewed as (B, h, n, G, hs). SDPA on 5-D
    inputs runs its math path (the fused kernels take 4-D only), which keeps no q, k, v of c_attn's output and no
    log-sum-exp: q·√scale and kᵀ·√scale (each the other's factor in q kᵀ), the softmax output (B, h, n, G, G)
    (its own backward, and attn @ v's factor for ∂L/∂v) and the padded v (B, h, n, G, hs). Its output is cut,
    concatenated and transposed into a new (B, T, C) tensor: c_proj's input, kept by c_proj if it needs it.
    The math path computes in fp32: it upcasts bf16 / fp16 inputs (unless
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)), so these four are fp32 whatever act_bytes is."""
    C, nh, (ratio, shift) = c.n_embd, c.n_head, plan.s2_attn
    a = max(a, 4)  # fp32 (measured on the CPU in bf16 too)
    hs, G = C // nh, max(1, round(ratio * T))  # S2Attention.forward's group size
    halves = [(nh // 2, 0), (nh - nh // 2, G // 2)] if shift and nh >= 2 else [(nh, 0)]  # (heads, front)
    for j, (heads, front) in enumerate(halves):
        n = math.ceil((front + T) / G)  # groups, the last one padded at the back
        grouped = B * heads * n * G * hs * a  # one (B, h, n, G, hs) tensor
        S[f"{h}.attn.s2_{j}.q_k_v"] = 3 * grouped  # q·√scale, k·√scale, padded v
        S[f"{h}.attn.s2_{j}.softmax"] = B * heads * n * G * G * a  # (B, h, n, G, G)


def _prompt_attention(S, c, B, T, i, h, plan, g, a) -> bool:
    """LLaMA-Adapter adds W_o [tanh(g_l) · softmax(q K_pᵀ/√hs) V_p], a softmax of its own over K prompts; g:
    whether the attention's input x needs a gradient. torch.matmul broadcasts (B, nh, T, hs) @ (nh, hs, K) by copying both
    to (B·nh, ·, ·): it keeps those copies of q (B, T, C) and, when q needs a gradient, of K_pᵀ (B, K, C); then the
    softmax (B, nh, T, K), the copy of V_p (B, K, C), the output y (B, T, C) for ∂L/∂g_l, and tanh(g_l) (nh,)."""
    if plan.prompt_attention is None or i not in plan.prompt_attention[0]:
        return False
    K, C, nh = plan.prompt_attention[1], c.n_embd, c.n_head
    S.update({f"{h}.attn.adapter_q": B * T * C * a, f"{h}.attn.adapter_softmax": B * nh * T * K * a,
              f"{h}.attn.adapter_vp": B * K * C * a, f"{h}.attn.adapter_y": B * T * C * a,
              f"{h}.attn.adapter_gate": nh * a})
    if g:
        S[f"{h}.attn.adapter_kp"] = B * K * C * a
    return True


def _adapter(S, plan, h, sub, in_key, x, BT, g, a) -> bool:
    """Adapter after a sublayer: out + W_up f(W_down ·). W_down keeps its (B, T, C) input: the sublayer's output
    (or, parallel, the sublayer's input, which c_attn / c_fc may keep already); then (B, T, m) tensors."""
    ad = plan.adapters
    if ad is None or sub not in ad.sublayers:
        return g
    S[in_key if ad.parallel else f"{h}.{sub}.out"] = x
    S[f"{h}.{sub}.adapter_f"] = BT * ad.m * a  # relu keeps its output f(z), which W_up keeps too; gelu keeps z
    if ad.nonlinearity == "gelu":
        S[f"{h}.{sub}.adapter_z"] = BT * ad.m * a  # ... and W_up keeps f(z): two (B, T, m) tensors
    return True


# ------------------------------------------------------------------------------ the estimate
def estimate(method: str, c: GPTConfig, B: int, T: int, config=None, *, checkpoint: bool = False,
             weight_bytes: int = 4, act_bytes: int | None = None) -> Memory:
    """Bytes of one training step of `method` (its default config, or `config`) on GPT(c), batch B x T.
    weight_bytes: of every floating tensor of the model (4 fp32, 2 bf16); act_bytes: of activations
    (default weight_bytes). checkpoint: per-block activation checkpointing (see checkpointing())."""
    plan, wb = plan_for(method, c, config), weight_bytes
    c = dataclasses.replace(c, block_size=plan.context_factor * c.block_size)  # the model the method leaves
    a = wb if act_bytes is None else act_bytes
    params, shapes = gpt2_parameters(c), linear_shapes(c)
    dense = sum(params.values()) - sum(math.prod(shapes[n]) for n in plan.quantized)  # stored in low bits instead
    weights = (dense + sum(plan.new_trainable) + plan.new_frozen) * wb + sum(plan.quantized.values())
    trainable = [k for n, k in params.items() if plan.trains(n)] + plan.new_trainable  # numel per trained tensor
    grads = sum(trainable) * wb
    optimizer = 2 * sum(trainable) * wb + 4 * len(trainable) + plan.method_state(wb)  # m, v + a step per tensor
    S = saved_tensors(c, B, T, plan, a)
    args = (method, c, B, T, config, checkpoint, wb, a)  # c: the model the method leaves
    if not checkpoint:
        return Memory(weights, grads, optimizer, sum(S.values()), plan.paged, S, args)
    blocks = [{k: v for k, v in S.items() if k.startswith(f"transformer.h.{i}.")} for i in range(c.n_layer)]
    x = B * (plan.prompt + T) * c.n_embd * a  # one block input (B, T, C)
    inputs = [x if blk else 0 for blk in blocks]  # a block with nothing to backpropagate keeps no input
    recompute = [sum(v for k, v in blk.items() if k != f"transformer.h.{i}.x") for i, blk in enumerate(blocks)]
    before = sum(S.get(k, 0) for k in ("idx", "pos", "prompt_encoder.relu"))  # saved before the first block
    after = sum(v for k, v in S.items() if not k.startswith("transformer.h.")) - before  # ln_f, head, loss
    peak, detail = checkpoint_peak(inputs, recompute, before, after)
    return Memory(weights, grads, optimizer, peak, plan.paged, detail, args)


def checkpoint_peak(inputs: list, recompute: list, before: int, after: int) -> tuple[int, dict]:
    """Saved activations at their peak with per-block checkpointing, from its pieces: inputs[i] the block input
    kept for block i, recompute[i] what block i saves when it runs again in backward, before / after what is
    saved outside the blocks before the first one (embedding indices) and after the last (ln_f, head, loss).
    At the end of forward everything kept is there. Backward frees the head's tensors first; block i is then
    recomputed while the inputs of blocks 0..i (and the tensors saved before the blocks) are still kept."""
    end = sum(inputs) + before + after
    during = [sum(inputs[:i + 1]) + r + before for i, r in enumerate(recompute)]
    peak = max([end, *during])
    where = "end of forward" if peak == end else f"recompute of block {during.index(peak)}"
    return peak, {"kept: block inputs": sum(inputs), "kept: before the blocks": before,
                  "kept: after the blocks": after, "recompute: largest block": max(recompute, default=0),
                  "kept": end, "peak at": where}


# ------------------------------------------------------------------------------ measuring
@contextlib.contextmanager
def checkpointing(model):
    """`with checkpointing(model):` each block runs under torch.utils.checkpoint (non-reentrant): its forward
    keeps only its input; backward runs the block again to get its activations. The GPT is left plain: the
    blocks are wrapped on entry and put back on exit."""
    blocks = list(model.transformer.h)
    for i, block in enumerate(blocks):
        model.transformer.h[i] = _Checkpointed(block)
    try:
        yield model
    finally:
        for i, block in enumerate(blocks):
            model.transformer.h[i] = block


class _Checkpointed(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False, **kwargs)


class _Meter(SavedTensorMeter):
    """train.SavedTensorMeter, counting only the tensors still saved when forward ends (a checkpointed block with
    nothing to backpropagate drops its input at once, and a freed storage's address can come back), and filing
    each storage under where it was first saved: "before" / "after" the blocks, or block i (its input apart)."""

    def __init__(self, model):
        super().__init__(model)
        self.where, self.inputs, self.saved = "before", {}, []
        blocks = list(model.transformer.h)
        self.hooks = [b.register_forward_pre_hook(functools.partial(self._enter, i)) for i, b in enumerate(blocks)]
        self.hooks += [b.register_forward_hook(lambda *_: setattr(self, "where", "after")) for b in blocks]

    def _enter(self, i, module, args):
        self.where, self.inputs[i] = i, args[0].untyped_storage()  # held: its address cannot go to another tensor

    def pack(self, t):
        self.saved.append((weakref.ref(t), self.where))  # the graph holds t itself while it needs it
        return t

    def pieces(self) -> dict:
        """{"before": bytes, "after": bytes, block i: bytes, ("input", i): bytes} of the saved tensors still
        alive, each storage once, parameters excluded."""
        seen, out = set(), {}
        input_of = {x.data_ptr(): i for i, x in self.inputs.items()}
        for ref, where in self.saved:
            t = ref()
            if t is None or (ptr := t.untyped_storage().data_ptr()) in self.param_storages or ptr in seen:
                continue
            seen.add(ptr)
            key = ("input", input_of[ptr]) if ptr in input_of else where
            out[key] = out.get(key, 0) + t.untyped_storage().nbytes()
        return out

    @property
    def bytes(self):
        return sum(self.pieces().values())

    def close(self):
        for hk in self.hooks:
            hk.remove()
        self.inputs = {}  # read pieces() before closing


def _batch(model, B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(model.config.vocab_size, (B, T), generator=g)
    return x.to(device), torch.roll(x, -1, dims=1).to(device)


def _setup(model):
    config = getattr(model, "minilora_config", None)
    opt = config.optimizer(model, 1e-3, 0.0) if config is not None else None
    opt = opt or default_optimizer(model, 1e-3, 0.0)  # the training loop's own choice
    callbacks = config.callbacks(model) if config is not None else []
    state = TrainState(model, opt, TrainConfig(steps=100, progress=False), step=1)
    for cb in callbacks:
        cb.on_train_start(state)
    return opt, callbacks, state


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors reachable through dicts, lists and tuples (a callback's state)."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def measure(model, B: int, T: int, *, checkpoint: bool = False, seed: int = 0) -> Memory:
    """One training step of `model` (method attached, or none: full) on the CPU, in its own dtype, on random
    tokens (B, T): weights, gradients and optimizer state after the step (train.tensor_memory, plus the
    tensors the method's callbacks keep), and the bytes autograd saved (train.SavedTensorMeter). With
    checkpoint, the tensors kept by the checkpointed forward are metered, each block's recompute is what that
    block saved in a plain forward (it runs the same ops again), and the peak is assembled from these measured
    pieces by checkpoint_peak's schedule: the pieces are measured, the order in which backward frees them is not."""
    model.train()
    x, y = _batch(model, B, T, "cpu", seed)
    opt, callbacks, state = _setup(model)
    meter = _Meter(model)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        _, loss = model(x, y)
    plain = meter.pieces()
    meter.close()
    if checkpoint:
        del loss
        with checkpointing(model):
            kept = _Meter(model)  # its hooks on the wrappers, so that each kept input is filed as ("input", i)
            with torch.autograd.graph.saved_tensors_hooks(kept.pack, lambda t: t):
                _, loss = model(x, y)
            L, ck = len(model.transformer.h), kept.pieces()
            kept.close()
            inputs = [ck.get(("input", i), 0) for i in range(L)]
            recompute = [plain.get(i, 0) for i in range(L)]  # block i saves the same when it runs again
            activations, detail = checkpoint_peak(inputs, recompute, ck.get("before", 0), ck.get("after", 0))
            detail["kept"] = sum(ck.values())  # measured as a whole too
            loss.backward()
    else:
        activations, detail = sum(plain.values()), plain
        loss.backward()
    for cb in callbacks:
        cb.on_before_optimizer_step(state)
    opt.step()
    for cb in callbacks:
        cb.on_step_end(state)
    mem = tensor_memory(model, opt)
    optimizer = mem["optimizer"] + sum(_tensor_bytes(vars(cb)) for cb in callbacks)
    paged = type(opt).__name__ == "PagedAdamW"
    return Memory(mem["weights"], mem["grads"], optimizer, activations, paged, detail)


# ------------------------------------------------------------------------------ measuring on a device
def measure_device(model, B: int, T: int, device, meter, *, checkpoint: bool = False, seed: int = 0,
                   keep_logits: bool = False) -> dict:
    """Allocator counters through a training step on `device`, after one warm-up step (so that the optimizer
    state exists, and on CUDA cuBLAS's workspaces): bytes allocated before the forward and at the end of each
    phase, and the most allocated at once during the forward, the backward and the optimizer step. `meter`
    reads the counters as torch.cuda does (synchronize, memory_allocated, max_memory_allocated,
    reset_peak_memory_stats, each taking the device): torch.cuda itself on a GPU (measure_cuda), a LiveBytes on
    the CPU. No autocast: the model runs in its own dtype, as estimate() assumes. The step keeps the loss and
    drops the logits (B, T, V) as soon as the loss exists: no backward needs them. keep_logits: keep them to the
    end of the step instead, as a loop with `_, loss = model(x, y)` does (predict_cuda's "logits": what it costs)."""
    dev = torch.device(device)
    model.to(dev).train()
    x, y = _batch(model, B, T, dev, seed)
    opt, callbacks, state = _setup(model)
    if dev.type != "cuda":  # AdamW takes its foreach path by default on CUDA only: ask for it, to allocate as there
        for group in opt.param_groups:
            if "foreach" in group and group["foreach"] is None:
                group["foreach"] = True
    out = {}

    def record(phase):
        meter.synchronize(dev)
        out[f"{phase}_peak"] = meter.max_memory_allocated(dev)
        out[f"after_{phase}"] = meter.memory_allocated(dev)
        meter.reset_peak_memory_stats(dev)

    with checkpointing(model) if checkpoint else contextlib.nullcontext():
        for _pass in ("warm-up", "measured"):  # the second pass overwrites the first one's numbers
            meter.synchronize(dev)
            out["before"] = meter.memory_allocated(dev)
            meter.reset_peak_memory_stats(dev)
            logits, loss = model(x, y)
            if not keep_logits:
                logits = None  # no backward needs them: dropped as soon as the loss exists
            record("forward")
            loss.backward()
            record("backward")
            for cb in callbacks:
                cb.on_before_optimizer_step(state)
            opt.step()
            record("step")
            for cb in callbacks:
                cb.on_step_end(state)
            del loss, logits
            opt.zero_grad(set_to_none=True)
    out["optimizer_state"] = tensor_memory(model, opt)["optimizer"] + sum(_tensor_bytes(vars(cb)) for cb in callbacks)
    return out


def measure_cuda(model, B: int, T: int, *, checkpoint: bool = False, seed: int = 0, device="cuda") -> dict:
    """measure_device on a GPU, read with torch.cuda's counters, and the GPU's name. (A test runs it on the CPU
    with device="cpu" and torch.cuda's five functions replaced by a LiveBytes's.)"""
    out = measure_device(model, B, T, device, torch.cuda, checkpoint=checkpoint, seed=seed)
    out["device"] = torch.cuda.get_device_name(device)
    return out


def _rounded(n: int) -> int:
    """Bytes the CUDA caching allocator counts for a tensor of n bytes: n rounded up to a multiple of 512."""
    return -(-n // 512) * 512


class LiveBytes(TorchDispatchMode):
    """A CPU stand-in for torch.cuda's allocator counters, with its functions' names: `with LiveBytes(model) as
    meter:` every tensor an operator returns is followed by a weak reference to its storage, and
    memory_allocated() is the bytes of the storages still alive, each rounded up to 512 as CUDA's caching
    allocator rounds a block; max_memory_allocated() is the largest such sum seen after an operator since
    reset_peak_memory_stats(). The references are the C++ storages' own weak references
    (torch.multiprocessing.reductions.StorageWeakRef): a storage held only by autograd's saved tensors, with
    no Python tensor left, still counts. The model's parameters and buffers, made before, count from the start.

    What it does not see, beside CUDA's: what a kernel allocates and frees inside one operator (CPU kernels'
    scratch buffers; on CUDA cuBLAS's workspaces, made once in a warm-up), a caching allocator (CUDA may hand
    out a cached block up to 1 MiB larger than asked), and tensors made outside it other than the model's."""

    def __init__(self, model=None):
        super().__init__()
        self.live, self.peak = {}, 0  # {StorageImpl address: (weak reference, rounded bytes)}
        for t in [*model.parameters(), *model.buffers()] if model is not None else []:
            self._follow(t)
        self.peak = self.memory_allocated()

    def _follow(self, t):
        if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.device.type != "meta":
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)  # holds the StorageImpl (not its bytes): the address stays this storage's
            self.live[ref.cdata] = (ref, _rounded(storage.nbytes()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self._follow(t)
        self.peak = max(self.peak, self.memory_allocated())
        return out

    def synchronize(self, device=None):
        pass  # the CPU ran each operator to its end already

    def memory_allocated(self, device=None) -> int:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        return sum(n for _, n in self.live.values())

    def max_memory_allocated(self, device=None) -> int:
        return max(self.peak, self.memory_allocated())

    def reset_peak_memory_stats(self, device=None):
        self.peak = self.memory_allocated()

    def get_device_name(self, device=None) -> str:
        return "CPU, live storages counted by memory.LiveBytes"


_TENSORS_PER_TERM = {"mean_rstd": 2, "q_k_v": 3}  # saved_tensors' terms that are several tensors of one size


def _allocated(S: dict, B: int, nh: int, lse_align: int) -> dict:
    """saved_tensors' terms as a device allocates them: each tensor rounded up to 512 bytes, the log-sum-exp
    (B, nh, Tx) fp32 padded to a multiple of lse_align positions, the caller's x and y (the embedding's ids, the
    loss's targets) left out: they are allocated before the forward."""
    out = {}
    for k, v in S.items():
        if k in ("idx", "loss.targets"):
            continue
        if k.endswith(".lse"):
            v = B * nh * 4 * math.ceil(v // (B * nh * 4) / lse_align) * lse_align
        n = _TENSORS_PER_TERM.get(k.rsplit(".", 1)[-1], 1)
        out[k] = n * _rounded(v // n)
    return out


def predict_cuda(mem: Memory, before: int | None = None, *, kernels: str = "cuda") -> dict:
    """What measure_device should find, from estimate()'s Memory, in the steady state (optimizer state
    allocated, no gradients before the forward). `before`: bytes allocated before the forward, by default the
    weights and the optimizer state on the device; pass measure_cuda's own to count what CUDA holds beside them
    (cuBLAS's workspaces, made in the warm-up, and the rounding of each weight), and so to compare whole peaks with
    torch.cuda.max_memory_allocated. Every tensor is rounded up to 512 bytes, as the allocator rounds a block.

        after_forward   + what forward keeps (estimate's activations, or with checkpointing its "kept"), less
                        the caller's x and y; the loss the caller holds and the 4-byte total weight: 512 each
        after_backward  + the gradients and the loss (so after_step)
        forward_peak    the largest of: at the loss, + the logits (B, T, V) it is computed from, and what
                        GPT.forward still holds that nothing saved (token embeddings, positions, ln_f's output);
                        block i at its widest, after what the blocks before it keep (with checkpointing: their
                        inputs): the residual, a LayerNorm's output and a linear's output, three times with a
                        branch (W0 x, s·B A x, their sum), or GELU's input and output, or an NF4 weight dequantized
        backward_peak   the largest of: its first step, + the log-probabilities' gradient and the logits', (B·T, V)
                        fp32 each, while the log-probabilities are still saved; its last, + the gradients and the
                        tied embedding's (V, C) gradient twice (the embedding's own, its sum with the head's);
                        block i's backward (after its recompute, with checkpointing), its tensors with the gradients
                        made so far (all of the method's own) and the residual's gradient, at GELU (its output's and
                        input's gradients, a third with a branch on mlp.c_proj) or an NF4 weight dequantized again
        step_peak       + the gradients and AdamW's foreach temporary sqrt(v), one tensor per trained one
        logits          what a caller that keeps the logits to the end of the step (`_, loss = model(x, y)`)
                        adds to every figure after the forward's peak: B·T·V·a

    kernels: whose allocations to count. "cuda": SDPA's memory-efficient kernel (the one fp32 runs: the flash
    kernels take 16-bit only) pads its log-sum-exp to a multiple of 32 positions, and an NF4 weight dequantizes
    in one Triton kernel (W alone). "cpu", as LiveBytes measures: flash attention for CPU pads nothing, and
    nf4.dequantize_nf4 holds 12 bytes per weight at its widest (int64 code indices and fp32 values). Exact in
    fp32 at the end of each phase; the peaks leave out what a kernel allocates inside one operator, a block's
    smaller gradients, QA-LoRA's dequantization and paged AdamW's page buffers."""
    if mem.inputs is None:
        raise ValueError("predict_cuda reads estimate()'s Memory (it keeps estimate's arguments); this one has "
                         "none (llama_estimate's, or measured): pass estimate(method, config, B, T)")
    if kernels not in ("cuda", "cpu"):
        raise ValueError(f"kernels={kernels!r}: 'cuda' (a GPU's kernels) or 'cpu' (LiveBytes on the CPU)")
    method, c, B, T, config, checkpoint, wb, a = mem.inputs
    plan = plan_for(method, c, config)
    Tx, C, V, L = plan.prompt + T, c.n_embd, c.vocab_size, c.n_layer
    S = saved_tensors(c, B, T, plan, a)
    dev = _allocated(S, B, c.n_head, 32 if kernels == "cuda" else 1)
    x, loss = _rounded(B * Tx * C * a), _rounded(4)  # one (B, Tx, C) tensor; the 0-d loss
    params = gpt2_parameters(c)
    trained = [(n, k) for n, k in params.items() if plan.trains(n)] + [("", k) for k in plan.new_trainable]
    grads = sum(_rounded(k * wb) for _, k in trained)
    if before is None:
        before = mem.weights + (0 if mem.optimizer_on_host else mem.optimizer)

    # the end of forward: all it saved, or with checkpointing the block inputs and what is saved outside the blocks
    first = sum(dev.get(k, 0) for k in ("pos", "prompt_encoder.relu"))  # saved before the first block
    blocks = [{k: v for k, v in dev.items() if k.startswith(f"transformer.h.{i}.")} for i in range(L)]
    outside = sum(v for k, v in dev.items() if not k.startswith("transformer.h."))  # first's too
    if not checkpoint:
        kept = sum(dev.values()) + loss
        earlier = [first + sum(sum(blk.values()) for blk in blocks[:i]) for i in range(L)]  # before block i
        held = [e + sum(blk.values()) for e, blk in zip(earlier, blocks)]  # block i's backward
    else:
        inputs = [x if blk else 0 for blk in blocks]
        kept = sum(inputs) + outside + loss
        earlier = [first + sum(inputs[:i + 1]) for i in range(L)]
        held = [e + sum(v for k, v in blk.items() if k != f"transformer.h.{i}.x")
                for i, (e, blk) in enumerate(zip(earlier, blocks))]

    # the moments that can be a phase's peak
    logits, fp32 = _rounded(B * T * V * a), _rounded(B * T * V * 4)
    pos = 0 if "pos" in S else _rounded(8 * Tx)  # GPT.forward's positions, unless wpe saved them
    forward = [kept + logits + (fp32 if a != 4 else 0) + x + pos + (0 if "ln_f.out" in S else x)]
    backward = [kept + 2 * fp32 + (logits if a != 4 else 0)]
    wte = 2 * _rounded(V * C * wb) if plan.trains("transformer.wte.weight") else 0
    backward.append(grads + loss + wte)
    shapes = linear_shapes(c)
    for i in range(L):
        h = f"transformer.h.{i}"
        in_bytes = {f"{h}.attn.c_attn": x, f"{h}.attn.c_proj": x, f"{h}.mlp.c_fc": x, f"{h}.mlp.c_proj": 4 * x}
        nf4 = [b + (_rounded(math.prod(shapes[n]) * a) if kernels == "cuda" else 12 * math.prod(shapes[n]))
               for n, b in in_bytes.items() if n in plan.quantized and plan.branches[n][0] != "qa_lora"]
        wide = [x + (3 if f"{h}.{n}" in plan.branches else 1) * y  # a LayerNorm's output, the linear's
                for n, y in (("attn.c_attn", 3 * x), ("mlp.c_fc", 4 * x))]
        forward.append(earlier[i] + x + pos + x + max(wide + [8 * x] + nf4))  # + the token embeddings, the residual
        if not blocks[i]:  # nothing to backpropagate through
            continue
        so_far = sum(_rounded(k * wb) for n, k in trained if n != "transformer.wpe.weight"
                     and not (n.startswith("transformer.h.") and int(n.split(".")[2]) < i))
        gelu = (3 if f"{h}.mlp.c_proj" in plan.branches else 2) * 4 * x
        backward.append(held[i] - dev.get(f"{h}.mlp.gelu", 0) + so_far + x + loss + max([gelu] + nf4))
    foreach = 0 if plan.paged else grads  # torch._foreach_sqrt(exp_avg_sqs): one new tensor per trained one
    return {"before": before, "after_forward": before + kept, "after_backward": before + grads + loss,
            "after_step": before + grads + loss, "forward_peak": before + max(forward),
            "backward_peak": before + max(backward), "step_peak": before + grads + loss + foreach, "logits": logits}


# ------------------------------------------------------------------------------ projection to LLaMA shapes
@dataclass(frozen=True)
class LlamaShape:
    """A LLaMA-style decoder: RMSNorm, attention with RoPE (grouped-query when n_kv_heads < n_heads), a SwiGLU
    MLP down(silu(gate x) ⊙ up x), untied embeddings and head, no biases."""
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab: int = 32000

    def linears(self) -> list[tuple[int, int]]:
        """(d_out, d_in) of one layer's q, k, v, o, gate, up, down."""
        d, kv, f = self.dim, self.dim // self.n_heads * self.n_kv_heads, self.d_ff
        return [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]

    def params(self) -> int:
        per_layer = sum(o * i for o, i in self.linears()) + 2 * self.dim  # + two RMSNorm weights
        return 2 * self.vocab * self.dim + self.n_layers * per_layer + self.dim  # embeddings, head, final norm


LLAMA = {  # LLaMA (Touvron et al. 2023, arXiv 2302.13971) 7B, 13B, 65B; "1.1B" is TinyLlama-1.1B's shape
    "1.1B": LlamaShape("TinyLlama-1.1B", 2048, 22, 32, 4, 5632),
    "7B": LlamaShape("LLaMA-7B", 4096, 32, 32, 32, 11008),
    "13B": LlamaShape("LLaMA-13B", 5120, 40, 40, 40, 13824),
    "65B": LlamaShape("LLaMA-65B", 8192, 80, 64, 64, 22016),
}


def llama_estimate(shape: LlamaShape, method: str, B: int = 1, T: int = 512, r: int = 64,
                   checkpoint: bool = True) -> Memory:
    """One step of 16-bit fine-tuning as the QLoRA paper sets it up: bf16 weights, activations and gradients,
    fp32 Adam moments (8 bytes per trained parameter). "lora" / "qlora": rank r on all seven linears of every
    layer, the base frozen, in bf16 (lora) or NF4 with double quantization (qlora; embeddings, head and norms
    stay bf16). Activations per layer, each (B, T, ·) tensor bf16 (fused RMSNorm, flash attention):
        x, rms_1(x), q, k (after RoPE), v, attention output, x2, rms_2(x2)     (6·dim + 2·kv) · BT
        gate, silu(gate), up, silu(gate) ⊙ up                                  4·d_ff · BT
        + two fp32 RMSNorm statistics and the fp32 log-sum-exp, + (B, T, r) per LoRA linear.
    checkpoint: each layer's input, plus one layer's tensors during its recompute. An estimate of the same
    kind as estimate(), not checked against a measurement here."""
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"llama_estimate knows 'full', 'lora' and 'qlora', not {method!r}")
    d, L, V, nh, f = shape.dim, shape.n_layers, shape.vocab, shape.n_heads, shape.d_ff
    kv, BT, P = shape.linears()[1][0], B * T, shape.params()
    lin = shape.linears()
    n_lin = L * sum(o * i for o, i in lin)  # the weights LoRA adapts (and QLoRA quantizes)
    n_lora = 0 if method == "full" else L * sum(r * (o + i) for o, i in lin)
    if method == "full":
        weights, trained = 2 * P, P
    else:
        base = 2 * n_lin if method == "lora" else L * sum(nf4_bytes(o * i) for o, i in lin)
        weights, trained = 2 * (P - n_lin) + base + 2 * n_lora, n_lora
    layer = 2 * BT * (6 * d + 2 * kv + 4 * f) + 2 * BT * 4 + B * nh * T * 4 + (method != "full") * 7 * BT * r * 2
    head = 2 * BT * d + 2 * BT * 4 + 4 * BT * V + 8 * BT  # final norm; fp32 log-probabilities; targets
    head += (method == "full") * 2 * BT * d  # the trained head keeps its input
    ids = (method == "full") * 8 * BT  # the trained embedding keeps its token ids
    detail = {"params": P, "trained": trained}
    if not checkpoint:
        acts = ids + L * layer + head
    else:
        x = 2 * BT * d  # a layer's input
        acts, pieces = checkpoint_peak([x] * L, [layer - x] * L, ids, head)
        detail.update(pieces)
    return Memory(weights, 2 * trained, 8 * trained, acts, detail=detail)


PUBLISHED = [  # (LLAMA key, method, GB, how the source states it, source): quoted only where verified
    ("65B", "full", 780, ">", "QLoRA (Dettmers et al. 2023, arXiv 2305.14314) §1: regular 16-bit finetuning of "
                              "LLaMA 65B requires more than 780 GB of GPU memory"),
    ("65B", "qlora", 48, "<", "QLoRA abstract: finetunes a 65B model on a single 48GB GPU"),
    ("7B", "lora", 15.57, "~", "torchtune QLoRA tutorial, Llama2-7B (LLaMA-7B's shape), peak memory reserved "
                               "while training, LoRA"),
    ("7B", "qlora", 9.29, "~", "same table, QLoRA"),
]


# ------------------------------------------------------------------------------ plots (the notebook's)
COLORS = {"weights": "#4c72b0", "grads": "#dd8452", "optimizer": "#55a868", "activations": "#c44e52"}


def plot_breakdown(rows: dict, ax=None, title: str = "", unit: float = 2**20, unit_name: str = "MiB"):
    """Stacked bars, one per label: {label: Memory}, weights / grads / optimizer / activations."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(rows), 3.6)) if ax is None else (ax.figure, ax)
    bottom = [0.0] * len(rows)
    for cat in CATEGORIES:
        vals = [getattr(m, cat) / unit for m in rows.values()]
        ax.bar(list(rows), vals, bottom=bottom, color=COLORS[cat], label=cat)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel(unit_name), ax.set_title(title)
    many = len(rows) > 4
    ax.set_xticks(range(len(rows)), list(rows), rotation=60 if many else 0, ha="right" if many else "center")
    ax.legend(fontsize=7)
    return fig


def plot_checkpointing(curves: dict, measured: dict | None = None, ax=None, unit: float = 2**20):
    """Activations against T: curves {label: [(T, bytes), ...]} as lines, measured {label: [(T, bytes)]} as dots."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6)) if ax is None else (ax.figure, ax)
    for label, pts in curves.items():
        line, = ax.plot([t for t, _ in pts], [b / unit for _, b in pts], label=label)
        for t, b in (measured or {}).get(label, []):
            ax.plot(t, b / unit, "o", color=line.get_color())
    ax.set_xlabel("T (tokens per sequence)"), ax.set_ylabel("activations (MiB)")
    ax.set_title("saved activations: lines = formula, dots = measured")
    ax.legend(fontsize=7)
    return fig


def plot_projection(rows: dict, published=PUBLISHED):
    """One panel per LLaMA shape: stacked GB of full / lora / qlora ({shape key: {method: Memory}}), with the
    published figures as black markers (▼ "less than", ▲ "more than", ● a measured value)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.8), squeeze=False)
    axes = list(axes[0])
    for ax, (key, methods) in zip(axes, rows.items()):
        plot_breakdown(methods, ax=ax, title=f"{LLAMA[key].name}", unit=1e9, unit_name="GB (10⁹ bytes)")
        for k, method, gb, how, _ in published:
            if k == key and method in methods:
                marker = {"<": "v", ">": "^"}.get(how, "o")
                ax.plot(list(methods).index(method), gb, marker, color="k", ms=8)
                ax.annotate(f"{how}{gb:g}", (list(methods).index(method), gb), xytext=(6, 0),
                            textcoords="offset points", fontsize=7)
        if ax is not axes[0]:
            ax.get_legend().remove()
    fig.tight_layout()
    return fig
