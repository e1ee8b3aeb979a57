"""AdaLoRA: Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv 2303.10512.

LoRA gives every adapted matrix the same rank. AdaLoRA writes each update in SVD form and moves rank to
the matrices that matter, pruning singular values by importance to a shrinking global budget b(t):

    h = W0 x + scaling · P Λ Q x          P (d_out, r), Λ = diag(λ) (r,), Q (r, d_in), scaling = alpha/init_r
    loss = L + γ Σ_matrices (‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F)           P, Q pushed towards orthonormal

    x ──┬── W0 ──────────────────────────────┐
        └── dropout ── Q ── Λ ── P ── ·scaling ──(+)── h

Names are PEFT's: lora_A = Q, lora_E = Λ, lora_B = P (saved keys base_model.model.<module>.lora_A, ...).
Trained: lora_A, lora_E, lora_B of each adapted matrix. Frozen: everything else, W0 included.
Init: Λ = 0, P and Q ~ N(0, 0.02²) (the authors' code), so ΔW = 0 at step 0 and λ gets a gradient at once.
Pruning a triplet (P_:i, λ_i, Q_i:) sets λ_i = 0 and changes nothing else; P, Q stay, so it can come back.
Schedule (RankAllocator, a training-loop callback that train() adds by itself): importance scores every
    step; keep the top-b(t) triplets over all matrices every deltaT steps (b(t): rank_budget); at step
    T − tfinal keep b(T), then *shrink*: slice P, Λ, Q (and Adam's moments) to the kept triplets, so
    the last tfinal steps train fewer parameters with fewer FLOPs. config.rank_pattern records the ranks.
Differences from PEFT's AdaLoRA: scaling alpha/init_r (PEFT: alpha/(init_r + 1e-5)); the regularizer is
    the paper's sum of squared norms (PEFT and the authors' code: the mean of unsquared norms); top-k by
    torch.topk keeps exactly b(t) (theirs: a threshold, which ties can undercut); PEFT never shrinks during
    training (it keeps masking), it slices only when saving; λ is (r,) here, (r, 1) in PEFT's file.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .attach import MethodConfig, find_targets, method_of, register, replace_module
from .train import Callback


@dataclass
class AdaLoRAConfig(MethodConfig):
    init_r: int = 12  # rank every matrix starts with: b(0) = init_r · n_matrices
    target_r: int = 8  # average rank at the end: b(T) = target_r · n_matrices (paper: b(0) = 1.5 b(T))
    tinit: int | None = None  # steps at b(0) before pruning starts (None: total_steps // 10)
    tfinal: int | None = None  # last steps at b(T), ranks fixed and shrunk (None: 3 · total_steps // 10)
    deltaT: int = 10  # re-allocate the budget every deltaT steps (paper: 100 on MNLI; PEFT's default: 1)
    beta1: float = 0.85  # EMA factor of the sensitivity Ī
    beta2: float = 0.85  # EMA factor of the uncertainty Ū
    orth_reg_weight: float = 0.5  # γ (PEFT's default; the paper uses 0.1 to 0.5)
    total_steps: int | None = None  # T of the schedule (None: TrainConfig.steps of the train() run)
    lora_alpha: float = 24  # scaling = lora_alpha / init_r = 2, as minilora's LoRA default (16/8)
    dropout: float = 0.0  # on the adapter's input (PEFT's lora_dropout)
    targets: list[str] | str = field(default_factory=lambda: ["c_attn", "c_proj", "c_fc"])  # every linear
    # of a block (q, k, v fused in c_attn; c_proj is attn.c_proj and mlp.c_proj), as attach.find_targets
    layers: list[int] | None = None  # only blocks transformer.h.<i> (PEFT's layers_to_transform)
    rank_pattern: dict = field(default_factory=dict)  # {module name: rank}, written by the shrink (rank 0
    # allowed); a module not named has init_r. Non-empty means "already shrunk": no more allocation.

    peft_type = "ADALORA"

    def __post_init__(self):
        if not (0 <= self.target_r <= self.init_r and 0 < self.beta1 < 1 and 0 < self.beta2 < 1
                and self.orth_reg_weight >= 0 and self.deltaT >= 1):
            raise ValueError(f"need 0 <= target_r ({self.target_r}) <= init_r ({self.init_r}), 0 < beta1, beta2 < 1 "
                             f"({self.beta1}, {self.beta2}), orth_reg_weight >= 0 ({self.orth_reg_weight}), "
                             f"deltaT >= 1 ({self.deltaT})")

    def trainable(self, name: str) -> bool:
        return re.search(r"\.lora_[AEB]$", name) is not None

    def callbacks(self, model) -> list:
        return [model.rank_allocator]  # made by apply(); model.rank_allocator.history after train()

    def export_state(self, model, state):  # PEFT keeps λ as a column (r, 1)
        return {k: v[:, None] if k.endswith(".lora_E") else v for k, v in state.items()}

    def import_state(self, model, state):
        return {k: v[:, 0] if k.endswith(".lora_E") else v for k, v in state.items()}

    def to_json(self) -> dict:
        tinit, tfinal = self.tinit or 0, self.tfinal or 0
        peft_ranks = {f"{m}.lora_E": [True] * k + [False] * (self.init_r - k) for m, k in self.rank_pattern.items()}
        return {"minilora_method": method_of(self), "minilora_config": dataclasses.asdict(self),
                "peft_type": "ADALORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
                "inference_mode": True, "init_r": self.init_r, "target_r": self.target_r, "tinit": tinit,
                "tfinal": tfinal, "deltaT": self.deltaT, "beta1": self.beta1, "beta2": self.beta2,
                "orth_reg_weight": self.orth_reg_weight, "lora_alpha": self.lora_alpha,
                "total_step": self.total_steps or tinit + tfinal + 1,  # PEFT refuses None; any T > tinit + tfinal loads
                "lora_dropout": self.dropout, "target_modules": self.targets, "layers_to_transform": self.layers,
                "layers_pattern": None if self.layers is None else "h", "bias": "none",
                "fan_in_fan_out": True,  # HF GPT-2's Conv1D holds W0 as (in, out); P and Q keep their shapes
                "rank_pattern": peft_ranks or None}  # PEFT's form: kept-singular-value flags per lora_E

    @classmethod
    def from_json(cls, raw: dict) -> "AdaLoRAConfig":
        if "minilora_config" in raw:
            return cls(**raw["minilora_config"])
        ranks = {re.sub(r"\.lora_E(\.\w+)?$", "", k): int(sum(v)) if isinstance(v, list) else int(v)
                 for k, v in (raw.get("rank_pattern") or {}).items()}  # PEFT's flags -> {module: rank}
        layers = raw.get("layers_to_transform")
        return cls(init_r=raw.get("init_r", 12), target_r=raw.get("target_r", 8), tinit=raw.get("tinit"),
                   tfinal=raw.get("tfinal"), deltaT=raw.get("deltaT", 1), beta1=raw.get("beta1", 0.85),
                   beta2=raw.get("beta2", 0.85), orth_reg_weight=raw.get("orth_reg_weight", 0.5),
                   total_steps=raw.get("total_step"), lora_alpha=raw.get("lora_alpha", 8),
                   dropout=raw.get("lora_dropout", 0.0), targets=raw.get("target_modules") or [],
                   layers=[layers] if isinstance(layers, int) else layers, rank_pattern=ranks)


class SVDLinear(nn.Module):
    """nn.Linear W0 (d_out, d_in) plus ΔW = scaling · P diag(λ) Q. The rank r is the length of λ;
    r = 0 is a valid module whose update is zero (a matrix that lost all its triplets)."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer  # W0, frozen, under PEFT's name
        d_out, d_in = (w := base_layer.weight).shape
        self.lora_A = nn.Parameter(w.new_empty(r, d_in))  # Q (r, d_in): right singular vectors
        self.lora_E = nn.Parameter(w.new_zeros(r))  # λ (r,): singular values, 0 so that ΔW = 0 at step 0
        self.lora_B = nn.Parameter(w.new_empty(d_out, r))  # P (d_out, r): left singular vectors
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        self.scaling = scaling  # alpha / init_r: fixed, so shrinking r leaves ΔW unchanged
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def r(self) -> int:
        return self.lora_E.numel()

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x):
        y = self.base_layer(x)  # W0 x (or (W0 + ΔW) x while merged)
        if self.merged:
            return y
        a = self.lora_dropout(x) @ (self.lora_E[:, None] * self.lora_A).T  # (B, T, d_in) @ (d_in, r): Λ Q x
        return y + (a @ self.lora_B.T) * self.scaling  # (B, T, r) @ (r, d_out) -> (B, T, d_out)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * self.lora_B @ (self.lora_E[:, None] * self.lora_A)  # (d_out, r) @ (r, d_in)

    def merge(self):
        """W0 <- W0 + ΔW; idempotent."""
        if not self.merged:
            with torch.no_grad():
                self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    def unmerge(self):
        if self.merged:
            with torch.no_grad():
                self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False

    def unload(self) -> nn.Module:
        return self.base_layer


@register("adalora", AdaLoRAConfig, lr=1e-2,
          description="AdaLoRA: SVD-form LoRA whose ranks are pruned by importance to a cubic budget")
def apply(model, config: AdaLoRAConfig) -> None:
    for n in find_targets(model, config.targets, config.layers):
        r, scaling = config.rank_pattern.get(n, config.init_r), config.lora_alpha / config.init_r
        replace_module(model, n, SVDLinear(model.get_submodule(n), r, scaling, config.dropout))
    model.rank_allocator = RankAllocator(config)  # the callback train() runs (config.callbacks)


def _layers(model) -> list[tuple[str, SVDLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDLinear)]


# ------------------------------------------------------------------------ the math, as pure functions
def orth_regularizer(model) -> torch.Tensor:
    """R = Σ over adapted matrices of ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F. A custom loop adds γ·R to its loss;
    train() adds its gradient through RankAllocator. ∂R/∂P = 4 P (PᵀP − I), ∂R/∂Q = 4 (QQᵀ − I) Q."""
    total = torch.zeros(())
    for _, m in _layers(model):
        P, Q, eye = m.lora_B, m.lora_A, torch.eye(m.r, device=m.lora_A.device, dtype=m.lora_A.dtype)
        total = total + (P.T @ P - eye).pow(2).sum() + (Q @ Q.T - eye).pow(2).sum()  # (r, r) each
    return total


def rank_budget(step: int, total_steps: int, init_budget: int, target_budget: int, tinit: int, tfinal: int) -> int:
    """b(t): init_budget for t <= tinit, then a cubic decay reaching target_budget at T − tfinal, then
    target_budget; rounded down, as the authors' code. (The callback re-allocates every deltaT steps only.)"""
    if step <= tinit:
        return init_budget
    if step > total_steps - tfinal:
        return target_budget
    progress = (step - tinit) / (total_steps - tinit - tfinal)  # 0 -> 1 over the budgeting phase
    return int(target_budget + (init_budget - target_budget) * (1 - progress) ** 3)


def update_importance(I_bar, U_bar, I, beta1: float, beta2: float):
    """One step of the smoothed sensitivity and its uncertainty (entry-wise):
    Ī <- β1 Ī + (1 − β1) I;  Ū <- β2 Ū + (1 − β2) |I − Ī| (with the new Ī). The score is s = Ī · Ū."""
    I_bar = beta1 * I_bar + (1 - beta1) * I
    U_bar = beta2 * U_bar + (1 - beta2) * (I - I_bar).abs()
    return I_bar, U_bar


def triplet_scores(s_A, s_E, s_B) -> torch.Tensor:
    """S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij): one score per singular value, (r,).
    s_A (r, d_in) for Q, s_E (r,) for λ, s_B (d_out, r) for P."""
    return s_E + s_B.mean(0) + s_A.mean(1)


def mask_to_budget(scores: dict, budget: int) -> dict:
    """{module: S (r,)} -> {module: keep (r,) bool}: exactly `budget` True over all modules together, the
    highest scores (global top-k: one matrix may keep all its triplets while another keeps none)."""
    flat = torch.cat(list(scores.values()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[flat.topk(min(budget, flat.numel())).indices] = True
    return dict(zip(scores, keep.split([s.numel() for s in scores.values()])))


def shrink(model, keep: dict, optimizer=None) -> None:
    """Drop the pruned triplets for good: P's columns, λ and Q's rows become new, smaller Parameters
    holding the kept entries (keep[module]). `optimizer`, if given, is patched to hold the new Parameters
    in the old ones' places, with their per-entry state (Adam's moments) sliced the same way, so training
    goes on as it would with the mask. Records model.minilora_config.rank_pattern."""
    new_of = {}  # id(old Parameter) -> (new Parameter, the rank dim, kept indices, old Parameter)
    for name, m in _layers(model):
        idx = keep[name].nonzero().flatten().to(m.lora_E.device)
        for attr, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):  # Q (r, d_in), λ (r,), P (d_out, r)
            old = getattr(m, attr)
            new = nn.Parameter(old.detach().index_select(dim, idx), requires_grad=old.requires_grad)
            if old.grad is not None:
                new.grad = old.grad.index_select(dim, idx)
            setattr(m, attr, new)
            new_of[id(old)] = new, dim, idx, old
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [new_of[id(p)][0] if id(p) in new_of else p for p in group["params"]]
        for new, dim, idx, old in new_of.values():
            if old in optimizer.state:
                optimizer.state[new] = {k: v.index_select(dim, idx) if torch.is_tensor(v) and v.shape == old.shape
                                        else v for k, v in optimizer.state.pop(old).items()}
    model.minilora_config.rank_pattern = {n: m.r for n, m in _layers(model)}


# ------------------------------------------------------------------------ the schedule, run by train()
class RankAllocator(Callback):
    """AdaLoRA's rank allocation as a training-loop callback. Per step t:
    before the optimizer step: add γ ∂R/∂(P, Q) to the gradients (R: orth_regularizer), keep a copy g_t;
    after it: I = |w · g_t| per entry (w after the step, as the authors' code and PEFT), update Ī, Ū;
      every deltaT steps in tinit < t < T − tfinal, zero the λ outside the top-b(t) triplets;
      at t = T − tfinal keep the top b(T), shrink, and stop allocating (the regularizer stays).
    history: {step: {module: rank}} of the last train() run, step 0 = before training."""

    def __init__(self, config: AdaLoRAConfig):
        self.config = config
        self.history: dict[int, dict[str, int]] = {}
        self.schedule: dict = {}  # rank_budget's arguments for this run (plot_budget takes it)

    def on_train_start(self, state):
        c, layers = self.config, _layers(state.model)
        T = c.total_steps or state.config.steps
        tinit = T // 10 if c.tinit is None else c.tinit
        tfinal = 3 * T // 10 if c.tfinal is None else c.tfinal
        self.done = bool(c.rank_pattern)  # already shrunk (trained before, or loaded): nothing to allocate
        if not self.done and not tinit < T - tfinal:
            raise ValueError(f"tinit {tinit} + tfinal {tfinal} leave no budgeting phase in {T} steps; "
                             f"lower tinit or tfinal, or train longer")
        self.schedule = dict(total_steps=T, init_budget=sum(m.r for _, m in layers),
                             target_budget=c.target_r * len(layers), tinit=tinit, tfinal=tfinal)
        self.keep = {n: torch.ones(m.r, dtype=torch.bool) for n, m in layers}
        self.ema, self.grads = {}, {}
        self.history = {0: self.ranks()}

    def on_before_optimizer_step(self, state):
        if self.config.orth_reg_weight > 0:  # the loss is L + γR: its gradient goes in with L's
            with torch.enable_grad():
                (self.config.orth_reg_weight * orth_regularizer(state.model)).backward()
        if not self.done:
            self.grads = {n: p.grad.detach().clone() for n, p in _params(state.model) if p.grad is not None}

    def on_step_end(self, state):
        t, model, s = state.step, state.model, self.schedule
        if not self.done:
            for n, p in _params(model):
                I = (p.detach() * self.grads.get(n, torch.zeros_like(p))).abs()  # sensitivity |w ∂L/∂w|
                zero = torch.zeros_like(p, dtype=torch.float32)
                self.ema[n] = update_importance(*self.ema.get(n, (zero, zero)), I.float(),
                                                self.config.beta1, self.config.beta2)
            final = t >= s["total_steps"] - s["tfinal"]
            if final or (t > s["tinit"] and t % self.config.deltaT == 0):
                self.keep = mask_to_budget(self.scores(model), rank_budget(t, **s))
                with torch.no_grad():
                    for n, m in _layers(model):
                        m.lora_E.masked_fill_(~self.keep[n].to(m.lora_E.device), 0.0)  # λ_i <- 0: pruned
            if final:
                shrink(model, self.keep, state.optimizer)
                self.keep = {n: torch.ones(m.r, dtype=torch.bool) for n, m in _layers(model)}
                self.done, self.ema, self.grads = True, {}, {}
        self.history[t] = self.ranks()

    def scores(self, model) -> dict:
        """{module: S (r,)}, the triplet scores from s = Ī · Ū of lora_A, lora_E, lora_B."""
        s = {n: (I_bar * U_bar).cpu() for n, (I_bar, U_bar) in self.ema.items()}
        return {n: triplet_scores(s[f"{n}.lora_A"], s[f"{n}.lora_E"], s[f"{n}.lora_B"]) for n, _ in _layers(model)}

    def ranks(self) -> dict:
        return {n: int(k.sum()) for n, k in self.keep.items()}


def _params(model):
    return [(n, p) for n, p in model.named_parameters() if re.search(r"\.lora_[AEB]$", n)]


# ------------------------------------------------------------------------ plots (the notebook's)
def plot_rank_heatmap(history: dict, step: int | None = None, ax=None):
    """Layer × matrix heat map of the ranks at `step` (default: the last recorded), as the paper's Fig. 3."""
    import matplotlib.pyplot as plt
    step = max(history) if step is None else step
    ranks = history[step]
    cells = {(int(m.group(1)), m.group(2)): r for n, r in ranks.items() if (m := re.search(r"\.h\.(\d+)\.(.+)$", n))}
    layers, kinds = sorted({i for i, _ in cells}), sorted({k for _, k in cells})
    grid = [[cells.get((i, k), float("nan")) for k in kinds] for i in layers]  # (n_layer, n_kinds)
    fig, ax = plt.subplots(figsize=(1.4 * len(kinds) + 1.5, 0.5 * len(layers) + 1.5)) if ax is None else (ax.figure, ax)
    im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    for i in range(len(layers)):
        for j in range(len(kinds)):
            ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", color="w")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("matrix"), ax.set_ylabel("layer"), ax.set_title(f"AdaLoRA ranks at step {step}")
    fig.colorbar(im, ax=ax, label="rank")
    return fig


def plot_budget(history: dict, schedule: dict | None = None, ax=None):
    """Total allocated rank against step; with `schedule` (RankAllocator.schedule) also the formula b(t)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.2)) if ax is None else (ax.figure, ax)
    steps = sorted(history)
    ax.step(steps, [sum(history[t].values()) for t in steps], where="post", label="allocated (Σ ranks)")
    if schedule:
        ax.plot(steps, [rank_budget(t, **schedule) for t in steps], "--", label="b(t), rank_budget")
    ax.set_xlabel("step"), ax.set_ylabel("total rank"), ax.legend(fontsize=8)
    return fig
