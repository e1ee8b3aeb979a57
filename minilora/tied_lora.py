"""Tied-LoRA (Renduchintala, Konuk, Kuchaiev 2023, arXiv 2311.09578).

    h = W0 x + Λ_v B Λ_u A x       A (r, d_in), B (d_out, r): ONE pair tied across layers (trained or frozen)
                                   Λ_u = diag(u), u (r,);  Λ_v = diag(v), v (d_out,): per layer (trained or fixed at 1)

LoRA gives every layer its own A and B; Tied-LoRA ties them, so all layers train the same pair, and gives each layer
two scaling vectors instead. Which of A, B, u, v train is the configuration (train_A, train_B, train_u, train_v):
    all four                       LoRA's A, B once for the model, plus per-layer u, v (the default here)
    A, B only                      plain weight-tied LoRA: every layer adds the same B A x
    u, v only (A, B frozen)        VeRA (vera.py): A, B random from the seed; equal to VeRAConfig for the same r, seed
The paper names its configurations by which factors train; those names could not be checked against the paper's text
here, so minilora uses the four flags instead.

Trained: the tied vera_A / vera_B (model.vera_projections.<group>) and the per-layer vera_lambda_d (= u) and
    vera_lambda_b (= v), as the flags say. The names are VeRA's: this is VeRA's module (vera.VeRALinear), with switches.
Frozen: W0; a frozen A or B is random (Kaiming-uniform from the seed, as VeRA's) and not stored; a frozen u or v is 1.
Init: the outermost trained factor of Λ_v B Λ_u A is 0 (v if it trains, else B, else u, else A), so ΔW = 0 at step 0;
    the others keep their init (A, B random, u = d_initial = 0.1 when it trains). All four: v = 0; A, B only: B = 0.
Shapes (tie): "module" (default) ties across blocks: every block's c_attn shares one pair, every attn.c_proj another
    (block index removed from the name); "all": one pair for every target, sized to the largest (d_out, d_in), each
    layer reading A[:, :d_in], B[:d_out] (VeRA's rule: c_proj's B is the first C rows of c_attn's 3C).
No alpha/r scaling: u and v scale the update.
Merge: W0 <- W0 + Λ_v B Λ_u A per layer, exact (vera.VeRALinear).
"""
from __future__ import annotations

from dataclasses import dataclass

from .attach import MethodConfig, register
from .vera import VeRAConfig, attach_shared


@dataclass
class TiedLoRAConfig(VeRAConfig):
    """VeRAConfig's fields (targets, layers, projection_prng_key, save_projection, d_initial, dropout), plus:"""
    r: int = 8  # rank of the tied pair
    train_A: bool = True  # the tied A (r, d_in) trains (False: frozen random from the seed)
    train_B: bool = True  # the tied B (d_out, r) trains
    train_u: bool = True  # each layer's u (r,) trains (False: fixed at 1)
    train_v: bool = True  # each layer's v (d_out,) trains
    tie: str = "module"  # "module": one pair per kind of target, tied across blocks; "all": one pair for all targets

    peft_type = None  # PEFT has no Tied-LoRA

    def __post_init__(self):
        super().__post_init__()
        if self.tie not in ("module", "all"):
            raise ValueError(f"tie={self.tie!r}: 'module' (one pair per kind of target) or 'all' (one for all)")
        if not (self.train_A or self.train_B or self.train_u or self.train_v):
            raise ValueError("train_A, train_B, train_u and train_v are all False, so nothing would train; "
                             "set at least one (train_u and train_v with frozen A, B is VeRA)")

    @property
    def train_d(self) -> bool:  # u is VeRA's d (vera_lambda_d)
        return self.train_u

    @property
    def train_b(self) -> bool:  # v is VeRA's b (vera_lambda_b)
        return self.train_v

    def to_json(self) -> dict:
        return MethodConfig.to_json(self)  # minilora's own fields: no PEFT equivalent

    @classmethod
    def from_json(cls, raw: dict) -> "TiedLoRAConfig":
        return super(VeRAConfig, cls).from_json(raw)  # MethodConfig's: the known fields


@register("tied_lora", TiedLoRAConfig, lr=1e-1,
          description="Tied-LoRA: one A, B pair tied across layers, per-layer scaling vectors u, v")
def apply(model, config: TiedLoRAConfig) -> None:
    attach_shared(model, config)
