"""LoRA-FA: Memory-efficient Low-rank Adaptation (Zhang, Zhang, Shi, Chu, Li 2023, arXiv 2308.03303).

    h = W0 x + (alpha/r) · B A x        A (r, d_in) frozen at its random init, B (d_out, r) trained

    x ──┬── W0 (frozen) ─────────────────────────────┐
        └── A (frozen) ── a = A x (r) ── B ── ·alpha/r ──(+)── h

Trained: lora_B of each adapted module (and biases with bias="all" or "lora_only").
Frozen: everything else, W0 and lora_A included ("FA": frozen A).
Init: A Kaiming-uniform (LoRA's distribution) drawn from a generator seeded with `seed`, B = 0, so ΔW = 0 and
    step 0 is the base model. A must be ≠ 0: ∂L/∂B = s·gᵀ a with a = A x. ΔW = s·B A stays in the row space of A.
Memory, the point of the paper. For y = x Wᵀ autograd needs x only for ∂L/∂W = gᵀ x and W only for ∂L/∂x = g W,
    and PyTorch saves an input only when the other one's gradient is wanted. Per adapted layer that gives:
        W0 x (W0 frozen)      keeps W0 (a weight, not an activation); never x
        a = A x, LoRA         keeps x (B, T, d_in) for ∂L/∂A, and A
        a = A x, LoRA-FA      keeps A only: ∂L/∂A is never computed
        B a (both)            keeps a (B, T, r) for ∂L/∂B, and B
    So LoRA-FA keeps B·T·d_in elements less per adapted layer, its input x (at x's element size: the bf16 copy's
    under autocast), wherever nothing else keeps x. LayerNorm and GELU keep their inputs, not their outputs, so on
    c_attn, c_fc and mlp.c_proj all of it is saved; attn.c_proj's input is the attention output, which the attention
    kernel keeps for its own backward, so there LoRA-FA saves nothing. No custom autograd is needed: freezing A is
    enough (tests/test_lora_fa.py::test_saved_activations_drop_by_exactly_the_layer_inputs checks it to the byte).
    A also has no gradient and no AdamW state. With dropout > 0, Dropout keeps a mask as large as x wherever x needs
    a gradient (every block but the first), which takes back most of the saving: keep dropout = 0 (the default).
Files: A is not trained, so the adapter file holds B only; `seed` in adapter_config.json regenerates A, bit for bit,
    when load_adapter attaches the method (A is drawn on the CPU in module order, then copied to the model's
    device and dtype). PEFT has no LoRA-FA adapter type, and a PEFT LoRA file needs A, so the file is minilora's only.
The optimizer: v1 of the paper (2023) trains B with the usual optimizer, and so does minilora by default. A revision
    under the same arXiv id, and PEFT's LoraFAOptimizer (peft/optimizers/lorafa.py), first correct B's gradient:
        ∂L/∂B ← (1/s²) · ∂L/∂B · (A Aᵀ)⁻¹
    With G = ∂L/∂W the full gradient, ∂L/∂B = s·G Aᵀ, so the corrected gradient's ΔW direction, s·(∂L/∂B) A, is
    G Aᵀ(A Aᵀ)⁻¹A: the least-squares fit of G in the row space of A. `project_grad=True` applies it, as a callback
    before gradient clipping (PEFT's runs inside optimizer.step, after any clipping, so the two clip differently).
Everything else (targets, ranks, merging) is LoRA's (lora.py). Named adapters (lora.add_adapter) are not supported:
    only apply() draws A from the seed.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import lora
from .attach import find_targets, method_of, register, replace_module
from .lora import LoRAConfig, LoRALinear
from .train import Callback


@dataclass
class LoRAFAConfig(LoRAConfig):
    """LoRAConfig's fields (r, alpha, dropout, targets, layers, ...), plus:"""
    named_adapters: ClassVar[bool] = False  # initialized at attach: lora.add_adapter would skip that
    seed: int = 0  # seeds the generator that draws every frozen A (saved in adapter_config.json, so A need not be)
    project_grad: bool = False  # True: ∂L/∂B ← (1/s²)·∂L/∂B·(AAᵀ)⁻¹ before AdamW (PEFT's LoraFAOptimizer)

    peft_type = None  # PEFT has no LoRA-FA files: its LoRA files go to "lora", and ours are not offered to PEFT

    def __post_init__(self):
        super().__post_init__()
        if self.embedding:
            raise ValueError("LoRA-FA on the embedding (embedding=True) is not supported: LoRA's embedding A starts "
                             "at 0, and frozen there it would never train; adapt linears only, or use LoRAConfig")

    def trainable(self, name: str) -> bool:
        return super().trainable(name) and ".lora_A." not in name  # B (and chosen biases) only

    def callbacks(self, model) -> list:
        return [ProjectGradient(model)] if self.project_grad else []

    def to_json(self) -> dict:  # no PEFT fields: PEFT would load this file with a random A of its own
        ours = {k: v for k, v in dataclasses.asdict(self).items() if k != "adapter_name"}
        return {"minilora_method": method_of(self), "minilora_config": ours}


class LoRAFALinear(LoRALinear):
    """A LoRALinear whose A is a fixed random projection: forward, merge and files of B are LoRA's."""

    @torch.no_grad()
    def reset_frozen_A(self, name: str, generator: torch.Generator):
        """A ← Kaiming-uniform(a=√5) from `generator` (LoRA's distribution), drawn on the CPU in fp32, so the same
        seed gives the same A on any device; then frozen."""
        A = self.lora_A[name].weight  # (g·r, d_in)
        A.copy_(nn.init.kaiming_uniform_(torch.empty(A.shape), a=math.sqrt(5), generator=generator))
        A.requires_grad_(False)

    @torch.no_grad()
    def project_grad(self, name: str):
        """∂L/∂B ← (1/s²)·∂L/∂B·(A Aᵀ)⁻¹ for each A, B pair (a fused c_attn has g of them)."""
        B, A = self.params(name)  # B (g·C, r), A (g·r, d_in)
        if B.grad is None:
            return
        g = len(self.parts[name] or [None])
        r = A.size(0) // g
        A_ = A.float().view(g, r, -1)  # (g, r, d_in)
        AAt = A_ @ A_.transpose(1, 2)  # (g, r, d_in) @ (g, d_in, r) -> (g, r, r), symmetric
        gB = B.grad.float().view(g, -1, r)  # (g, C, r): pair j's rows
        fixed = torch.linalg.solve(AAt, gB.transpose(1, 2)).transpose(1, 2)  # ((AAᵀ)⁻¹ gBᵀ)ᵀ = gB (AAᵀ)⁻¹: (g, C, r)
        B.grad.copy_((fixed / self.scaling[name] ** 2).view_as(B.grad))


class ProjectGradient(Callback):
    """project_grad=True: corrects every B's gradient after backward, before clipping and AdamW."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, LoRAFALinear)]
        self.name = model.minilora_config.adapter_name

    def on_before_optimizer_step(self, state):
        for m in self.layers:
            m.project_grad(self.name)


@register("lora_fa", LoRAFAConfig, lr=3e-2,
          description="LoRA-FA: LoRA with A frozen at a seeded random init; trains B, keeps no layer input")
def apply(model, config: LoRAFAConfig) -> None:
    for n in find_targets(model, config.targets, config.layers):  # the nn.Linear modules LoRA would adapt
        replace_module(model, n, LoRAFALinear(model.get_submodule(n)))
    lora.apply(model, config)  # LoRA's attach adds A (from the global RNG) and B = 0 to each LoRAFALinear
    generator = torch.Generator().manual_seed(config.seed)
    for _, m in lora._named_layers(model):  # in module order: the same config and model give the same A's
        m.reset_frozen_A(config.adapter_name, generator)
