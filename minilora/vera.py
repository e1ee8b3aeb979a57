"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort, Asano 2024, arXiv 2310.11454).

    h = W0 x + Λ_b B Λ_d A x       A (r, d_in), B (d_out, r): random, frozen, ONE pair shared by all adapted layers
                                   Λ_d = diag(d), d (r,);  Λ_b = diag(b), b (d_out,): per layer, trained

    x ──┬── W0 ─────────────────────────────────┐
        └── A ── ⊙ d ── B ── ⊙ b ──────────────(+)── h        A, B: the model's one pair (model.vera_projections)

Trained: vera_lambda_d (d) and vera_lambda_b (b) of each adapted module: r + d_out numbers per layer.
Frozen: W0, and A, B, which are not even stored: they are drawn again from a seed (projection_prng_key).
Init: A, B Kaiming-uniform from torch.Generator().manual_seed(seed), A first (PEFT's _kaiming_init, so the same seed
    gives PEFT's matrices, bit for bit); b = 0, so ΔW = 0 at step 0; d = d_initial = 0.1 (PEFT's default).
Shapes: layers of different shapes share one pair of the largest (d_out, d_in) over the targets; each layer reads
    the top-left block it needs, A[:, :d_in] and B[:d_out] (PEFT's rule).
Files: the seed, not A and B (save_projection=False here; PEFT's default True also writes base_model.vera_A/vera_B).
Merge: W0 <- W0 + Λ_b B Λ_d A, exact.
Tied-LoRA (tied_lora.py) is this module with switches: its tied A, B may train, and its u, v are d, b.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from .attach import MethodConfig, find_targets, method_of, register, replace_module
from .checkpoint import CheckpointError
from .lora import LoRALayer


@dataclass
class VeRAConfig(MethodConfig):
    r: int = 256  # rows of A, columns of B (PEFT's default: VeRA trains r + d_out per layer, so r can be large)
    targets: list[str] | str = field(default_factory=lambda: ["c_attn"])  # as attach.find_targets
    layers: list[int] | None = None  # only blocks transformer.h.<i> (PEFT's layers_to_transform)
    projection_prng_key: int = 0  # the seed A and B are drawn from
    save_projection: bool = False  # also write A and B into the adapter file (PEFT's default: True)
    d_initial: float = 0.1  # d at init (b starts at 0)
    dropout: float = 0.0  # on the branch input only (PEFT's vera_dropout)

    # What trains: VeRA's fixed answer. TiedLoRAConfig makes these its fields (train_u/train_v are d/b there).
    train_A: ClassVar[bool] = False
    train_B: ClassVar[bool] = False
    train_d: ClassVar[bool] = True
    train_b: ClassVar[bool] = True
    tie: ClassVar[str] = "all"  # one pair for all targets ("module": one per kind of target, see group())

    peft_type = "VERA"

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"r={self.r}: the rank must be a positive integer")

    def trainable(self, name: str) -> bool:
        on = {".vera_A": self.train_A, ".vera_B": self.train_B,
              ".vera_lambda_d": self.train_d, ".vera_lambda_b": self.train_b}
        return name.endswith(tuple(k for k, v in on.items() if v))

    def group(self, module: str) -> str:
        """Which shared pair a module reads: "all", or with tie="module" its name without the block index
        (transformer.h.3.attn.c_attn -> attn_c_attn), so every block's c_attn shares one pair."""
        return "all" if self.tie == "all" else re.sub(r"^transformer\.h\.\d+\.", "", module).replace(".", "_")

    def zero_factor(self) -> str:
        """The outermost trained factor of Λ_b B Λ_d A starts at 0, so ΔW = 0 at step 0 (VeRA: b)."""
        return next(f for f, on in (("b", self.train_b), ("B", self.train_B), ("d", self.train_d),
                                    ("A", self.train_A)) if on)

    # ---------------------------------------------------------------- the files
    def _frozen(self, model):  # (file key, frozen tensor) of every projection that is regenerated, not trained
        return [(f"base_model.{n}" + ("" if g == "all" else f".{g}"), getattr(p, n))  # PEFT's base_model.vera_A
                for g, p in model.vera_projections.items() for n in ("vera_A", "vera_B") if not self.trainable("." + n)]

    def export_state(self, model, state):
        return {**state, **{k: t.detach() for k, t in self._frozen(model)}} if self.save_projection else state

    def import_state(self, model, state):
        """Stored projections are copied into the model's frozen A, B (as PEFT loads them); without them the
        model's A, B must come from the file's seed."""
        mine, frozen = model.minilora_config, self._frozen(model)
        if frozen and not self.save_projection and mine.projection_prng_key != self.projection_prng_key:
            raise CheckpointError(
                f"this adapter was trained on A, B drawn from seed {self.projection_prng_key}, but the model's "
                f"{method_of(mine)} uses seed {mine.projection_prng_key}: load it onto a model with nothing attached "
                f"(load_adapter attaches with the file's seed) or attach with projection_prng_key="
                f"{self.projection_prng_key}")
        with torch.no_grad():
            for key, t in frozen:
                if key in state:
                    t.copy_(state.pop(key))
        return state

    def to_json(self) -> dict:
        layers = self.layers
        return {"minilora_method": method_of(self), "minilora_config": dataclasses.asdict(self), "peft_type": "VERA",
                "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "inference_mode": True, "r": self.r,
                "target_modules": self.targets, "layers_to_transform": layers,
                "layers_pattern": None if layers is None else "h", "projection_prng_key": self.projection_prng_key,
                "save_projection": self.save_projection, "vera_dropout": self.dropout, "d_initial": self.d_initial,
                "fan_in_fan_out": True,  # HF GPT-2's Conv1D holds W0 as (in, out); A and B keep their shapes
                "bias": "none", "init_weights": True, "modules_to_save": None}

    @classmethod
    def from_json(cls, raw: dict) -> "VeRAConfig":
        if "minilora_config" in raw:  # saved by minilora: our own fields, exactly
            return cls(**raw["minilora_config"])
        if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
            raise CheckpointError(f"this PEFT VeRA adapter trains biases or other modules (bias={raw.get('bias')!r}, "
                                  f"modules_to_save={raw.get('modules_to_save')}), which minilora's VeRA does not do")
        targets, layers = raw.get("target_modules") or ["c_attn"], raw.get("layers_to_transform")
        return cls(r=raw.get("r", 256), targets=sorted(targets) if isinstance(targets, list) else targets,
                   layers=[layers] if isinstance(layers, int) else layers,
                   projection_prng_key=raw.get("projection_prng_key", 0),
                   save_projection=raw.get("save_projection", True), d_initial=raw.get("d_initial", 0.1),
                   dropout=raw.get("vera_dropout", 0.0))


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's _kaiming_init: U(−bound, bound), bound = √3 · √2/√fan_in, fan_in = shape[1], from `generator`."""
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))  # PEFT's order of operations: the same floats
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class Projections(nn.Module):
    """One shared pair, A (r, d_in) and B (d_out, r), (d_out, d_in) the largest over the layers that read it.
    A frozen factor is a buffer left out of state_dict (the seed makes it again); a trained one (Tied-LoRA) is a
    Parameter."""

    def __init__(self, r, d_in, d_out, generator, train_A=False, train_B=False, like=None):
        super().__init__()
        for name, shape, train in (("vera_A", (r, d_in), train_A), ("vera_B", (d_out, r), train_B)):  # A first
            t = kaiming_uniform(shape, generator).to(like.device, like.dtype)
            if train:
                self.register_parameter(name, nn.Parameter(t))
            else:
                self.register_buffer(name, t, persistent=False)


class SharedProjections(nn.ModuleDict):
    """model.vera_projections, {group: Projections}: the model owns each pair once; layers hold references."""

    def unload(self):
        return None  # merge_and_unload: nothing of it stays in the plain model


class VeRALinear(LoRALayer):
    """nn.Linear W0 (d_out, d_in) plus Λ_b B Λ_d A x. Routing, merge, unmerge and unload are LoRALayer's, with one
    adapter ("default", scaling 1) whose factors are (Λ_b B, Λ_d A)."""
    _per_adapter = ("scaling",)

    def __init__(self, base_layer: nn.Linear, shared: Projections, r: int, d_init: float, b_init: float,
                 dropout: float = 0.0):
        super().__init__(base_layer)
        self.shared = (shared,)  # a tuple: a reference, not a submodule (model.vera_projections owns it)
        w = base_layer.weight  # (d_out, d_in)
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_init), device=w.device, dtype=w.dtype))
        self.vera_lambda_b = nn.Parameter(torch.full((w.size(0),), float(b_init), device=w.device, dtype=w.dtype))
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling["default"] = 1.0

    def projections(self):
        """This layer's blocks of the shared pair: A[:, :d_in] (r, d_in), B[:d_out] (d_out, r)."""
        d_out, d_in = self.base_layer.weight.shape
        p = self.shared[0]
        return p.vera_A[:, :d_in], p.vera_B[:d_out]

    def factors(self, name="default"):
        """(Λ_b B, Λ_d A): ΔW = Λ_b B Λ_d A is LoRA's B A with these two (LoRALayer.delta_weight, merge)."""
        A, B = self.projections()
        return self.vera_lambda_b[:, None] * B, self.vera_lambda_d[:, None] * A  # (d_out, r), (r, d_in)

    def update(self, x, name="default"):
        A, B = self.projections()
        a = (self.vera_dropout(x) @ A.T) * self.vera_lambda_d  # (B, T, d_in) @ (d_in, r) -> (B, T, r), ⊙ d
        return (a @ B.T) * self.vera_lambda_b  # (B, T, r) @ (r, d_out) -> (B, T, d_out), ⊙ b


def attach_shared(model, config: VeRAConfig) -> None:
    """VeRA's (and Tied-LoRA's) attach: one Projections per group (config.group), all drawn in turn from one
    generator seeded with projection_prng_key, then every target wrapped in a VeRALinear that reads its group's."""
    names = find_targets(model, config.targets, config.layers)
    groups: dict[str, list[nn.Linear]] = {}
    for n in names:  # in model order
        groups.setdefault(config.group(n), []).append(model.get_submodule(n))
    generator = torch.Generator().manual_seed(config.projection_prng_key)
    shared = SharedProjections()
    for g, linears in groups.items():
        d_out, d_in = (max(m.weight.size(i) for m in linears) for i in (0, 1))  # the largest shape reads it all
        shared[g] = Projections(config.r, d_in, d_out, generator, config.train_A, config.train_B, linears[0].weight)
    zero = config.zero_factor()
    if zero in ("A", "B"):
        with torch.no_grad():
            for p in shared.values():
                getattr(p, "vera_" + zero).zero_()
    model.vera_projections = shared
    d0 = 0.0 if zero == "d" else config.d_initial if config.train_d else 1.0  # a frozen vector is 1: no effect
    b0 = 0.0 if zero == "b" else 1.0
    for n in names:
        layer = VeRALinear(model.get_submodule(n), shared[config.group(n)], config.r, d0, b0, config.dropout)
        replace_module(model, n, layer)


@register("vera", VeRAConfig, lr=1e-1,
          description="VeRA: one frozen random A, B pair for all layers; trains a scaling vector on each side")
def apply(model, config: VeRAConfig) -> None:
    attach_shared(model, config)
