"""Why a low rank suffices: the evidence of LoRA §7 (Hu et al. 2021, arXiv 2106.09685) and the intrinsic
dimension (Aghajanyan, Zettlemoyer, Gupta 2020, arXiv 2012.13255), as functions that read trained models.

Spectrum of a full fine-tuning update, per layer and matrix (GPT-2's fused c_attn split into W_q, W_k, W_v):
    ΔW = W_ft − W0 = U diag(σ) Vᵀ,    energy(k) = Σ_{i≤k} σ_i² / Σ_i σ_i²   (energy(rank) = 1)
Subspace similarity of two LoRA A matrices (LoRA §7.2, eq. 4), U_A the right singular vectors of A (r, d_in):
    φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j) ∈ [0, 1]
    independent random subspaces of R^d_in: E ‖U1[:, :i]ᵀ U2[:, :j]‖_F² = i·j / d_in
Amplification (LoRA §7.3, Table 7), U, V the top-r left/right singular vectors of ΔW:
    ‖ΔW‖_F / ‖Uᵀ W V‖_F     (compared with ‖Uᵀ W V‖_F for U, V from W itself and random)
Intrinsic dimension: train only θ_d (d,) in
    θ = θ0 + P θ_d,    P = Fastfood (D, d) (Le et al. 2013, as Li et al. 2018 and Aghajanyan et al. 2020)
    d90 = the smallest d whose metric reaches 90 % of full fine-tuning's.
Trained (IntrinsicGPT): θ_d only. Frozen: θ0 (every base parameter) and the projection P.
Init: θ_d = 0, so θ = θ0 exactly and step 0 is the base model.
"""
from __future__ import annotations

import copy
import math
import zlib

import torch
import torch.nn as nn
from torch.func import functional_call

from .attach import attach
from .lora import LoRAConfig
from .train import TrainConfig, train

MATRICES = ("q", "k", "v", "o", "fc", "proj")  # W_q, W_k, W_v (thirds of c_attn), attn.c_proj, mlp.c_fc, mlp.c_proj


# ------------------------------------------------------------------------ the matrices of a GPT
def weight_matrices(model) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, matrix): W (d_out, d_in)} for every block; c_attn (3C, C) is split row-wise into W_q, W_k,
    W_v, as its output splits into q, k, v (gpt.py). Reads a plain GPT or one with merged adapters."""
    out = {}
    for i, block in enumerate(model.transformer.h):
        qkv = block.attn.c_attn.weight.detach()  # (3C, C)
        for name, w in zip("qkv", qkv.chunk(3, dim=0)):  # 3 x (C, C)
            out[(i, name)] = w
        out[(i, "o")] = block.attn.c_proj.weight.detach()  # (C, C)
        out[(i, "fc")] = block.mlp.c_fc.weight.detach()  # (4C, C)
        out[(i, "proj")] = block.mlp.c_proj.weight.detach()  # (C, 4C)
    return out


def weight_deltas(tuned, base) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, matrix): ΔW = W_tuned − W_base}: full fine-tuning's update (or a LoRA model's, merged)."""
    w0 = weight_matrices(base)
    return {key: w - w0[key] for key, w in weight_matrices(tuned).items()}


# ------------------------------------------------------------------------ spectrum of ΔW
def energy(delta: torch.Tensor) -> torch.Tensor:
    """Cumulative energy of the singular values: e[k-1] = Σ_{i≤k} σ_i² / Σ σ_i² (nondecreasing, e[-1] = 1)."""
    s = torch.linalg.svdvals(delta.double())  # (min(d_out, d_in),), descending
    if s[0] == 0:
        raise ValueError(f"ΔW {tuple(delta.shape)} is zero: nothing changed this matrix, so it has no spectrum; "
                         f"leave it out (e.g. a matrix LoRA did not adapt)")
    return (s.square().cumsum(0) / s.square().sum()).float()


def rank_for_energy(e: torch.Tensor, frac: float = 0.9) -> int:
    """The smallest k with energy(k) >= frac."""
    return int((e < frac - 1e-9).sum()) + 1


# ------------------------------------------------------------------------ subspace similarity
def right_singular(A: torch.Tensor) -> torch.Tensor:
    """A (r, d_in) = U Σ Vᵀ -> V (d_in, r): the paper's U_A, ordered by singular value."""
    return torch.linalg.svd(A.double(), full_matrices=False)[2].T


def subspace_similarity(A1, A2, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j): 1 when one span holds the other, 0 if orthogonal."""
    U1, U2 = right_singular(A1), right_singular(A2)
    return float((U1[:, :i].T @ U2[:, :j]).square().sum() / min(i, j))  # (i, d_in) @ (d_in, j) -> (i, j)


def similarity_grid(A1, A2) -> torch.Tensor:
    """φ(A1, A2, i, j) for every i <= r1, j <= r2 as an (r1, r2) tensor: the heat maps of LoRA Fig. 3-4."""
    U1, U2 = right_singular(A1), right_singular(A2)
    M = (U1.T @ U2).square()  # (r1, d_in) @ (d_in, r2) -> (r1, r2): squared cosines of direction pairs
    i, j = torch.arange(1, M.size(0) + 1), torch.arange(1, M.size(1) + 1)
    return (M.cumsum(0).cumsum(1) / torch.minimum(i[:, None], j[None, :])).float()


def random_similarity(i: int, j: int, d: int) -> float:
    """E φ for independent uniformly random subspaces of R^d: (i·j/d) / min(i, j) = max(i, j) / d."""
    return i * j / d / min(i, j)


def plot_similarity(grid: torch.Tensor, ax, title: str = ""):
    """A heat map of φ(i, j) (rows i, columns j), colour scale fixed to [0, 1] as in LoRA Fig. 3-4."""
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper",
                   extent=(0.5, grid.size(1) + 0.5, grid.size(0) + 0.5, 0.5))
    ax.set_xlabel("j"), ax.set_ylabel("i"), ax.set_title(title, fontsize=9)
    return im


def lora_A(model, layer: int, matrix: str, adapter: str = "default") -> torch.Tensor:
    """The trained A (r, d_in) of one projection: a third of a fused c_attn's stacked A, or attn.c_proj's."""
    attn = model.transformer.h[layer].attn
    if matrix == "o":
        return attn.c_proj.lora_A[adapter].weight.detach()
    m, p = attn.c_attn, "qkv".index(matrix)
    parts = m.parts[adapter]
    if parts is None or p not in parts:
        raise ValueError(f"layer {layer}'s c_attn has no A of its own for W_{matrix} (fused_qkv={parts and ['qkv'[i] for i in parts]}):"
                         f" attach LoRA with fused_qkv listing {matrix!r}, e.g. lora_config({matrix!r}, r)")
    A = m.lora_A[adapter].weight.detach()  # (g·r, C): the g pairs' A stacked, in the order of parts
    return A.chunk(len(parts))[parts.index(p)]  # (r, C)


# ------------------------------------------------------------------------ amplification
def top_singular(M: torch.Tensor, r: int):
    """U (d_out, r), V (d_in, r): the top-r left and right singular vectors of M."""
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :r], Vh[:r].T


def projection_norm(W, U, V) -> float:
    """‖Uᵀ W V‖_F: how much of W lives in the r-dimensional subspaces U (d_out, r), V (d_in, r)."""
    return float(torch.linalg.matrix_norm(U.T @ W.double() @ V))  # (r, d_out) @ (d_out, d_in) @ (d_in, r)


def amplification(delta, W, r: int, seed: int = 0) -> dict:
    """LoRA Table 7 for one matrix: ‖Uᵀ W V‖_F with U, V the top-r singular vectors of ΔW, of W, and random
    orthonormal; ‖W‖_F, ‖ΔW‖_F, and the amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F (U, V from ΔW)."""
    g = torch.Generator().manual_seed(seed)
    rand = [torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0] for n in W.shape]
    out = {"delta": projection_norm(W, *top_singular(delta, r)), "W": projection_norm(W, *top_singular(W, r)),
           "random": projection_norm(W, *rand), "norm_W": float(W.norm()), "norm_delta": float(delta.norm())}
    out["factor"] = out["norm_delta"] / out["delta"]
    return out


# ------------------------------------------------------------------------ LoRA on chosen matrices
def lora_config(matrices: str, r: int, alpha: float = 16) -> LoRAConfig:
    """LoRA on some of W_q, W_k, W_v, W_o of every block: "qv" -> fused_qkv=["q", "v"] on c_attn, "o" ->
    attn.c_proj. Each adapted matrix gets its own rank-r pair: r·(d_in + d_out) = 2·r·C parameters."""
    qkv = [m for m in "qkv" if m in matrices]
    if not qkv and "o" not in matrices or set(matrices) - set("qkvo"):
        raise ValueError(f"matrices {matrices!r}: pick letters from 'qkvo', e.g. 'qv' or 'qkvo'")
    targets = (["c_attn"] if qkv else []) + (["attn.c_proj"] if "o" in matrices else [])
    return LoRAConfig(r=r, alpha=alpha, targets=targets, fused_qkv=qkv or None)


def attach_seeded(base, config, seed: int = 0):
    """A copy of `base` with `config` attached, its new weights drawn from a seed made of (config, seed).
    Why not just torch.manual_seed(seed): LoRA's A is filled row by row from the random stream, so an r = 8 and
    an r = 64 run started from one seed would share their first A rows, a subspace overlap made by the init."""
    model = copy.deepcopy(base)
    torch.manual_seed(zlib.crc32(repr((config, seed)).encode()))
    return attach(model, config)


def finetune_from(base, config, task, train_cfg: TrainConfig):
    """Train attach_seeded(base, config, train_cfg.seed) on `task`; returns (model, record)."""
    model = attach_seeded(base, config, train_cfg.seed)
    return model, train(model, task, train_cfg)


# ------------------------------------------------------------------------ intrinsic dimension
def hadamard(n: int) -> torch.Tensor:
    """Sylvester's Walsh-Hadamard matrix (2^n, 2^n), entries ±1: H_1 = [[1, 1], [1, -1]], H_{n+1} = H_1 ⊗ H_n."""
    H = torch.ones(1, 1)
    for _ in range(n):
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)])
    return H


def fwht(x: torch.Tensor, block: int = 7) -> torch.Tensor:
    """H x for x (L,), L = 2^n, without forming H (L, L): H_L = H_a ⊗ H_b ⊗ ... with factors of 2^block
    (≤ 128), each applied to its group of index bits as one matmul. O(L·2^block) work; H x needs no
    gradient rule of its own (matmuls; H is symmetric, so the backward is H again)."""
    L = x.numel()
    n = L.bit_length() - 1
    if L != 1 << n:
        raise ValueError(f"fwht needs a length that is a power of 2, got {L}; pad with zeros")
    s = min(block, n)
    y = x.reshape(-1, 1 << s) @ hadamard(s).to(x)  # (L/m, m) @ (m, m): the lowest s index bits
    done = s
    while done < n:  # the next s index bits: a batch of (m, m) @ (m, 2^done)
        s = min(block, n - done)
        y = hadamard(s).to(x) @ y.reshape(-1, 1 << s, 1 << done)  # (L/(m·2^done), m, 2^done)
        done += s
    return y.reshape(L)


class _Permute(torch.autograd.Function):
    """y = x[perm]. Its gradient is g[perm⁻¹], one more gather; PyTorch's generic rule for indexing is a
    scatter-add, several times slower on the 2^21 entries here."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.inverse = inverse
        return x[perm]

    @staticmethod
    def backward(ctx, g):
        return g[ctx.inverse], None, None


class Fastfood(nn.Module):
    """P θ_d = (H G Π H B pad(θ_d))[:D] / sqrt(D·‖G‖²): a (D, d) random projection, never stored.

    pad: θ_d (d,) with zeros to L = 2^⌈log2 max(D, d)⌉; B: random ±1 (L,); H: Walsh-Hadamard (fwht);
    Π: a random permutation; G: N(0, 1) (L,); then the first D entries. Memory O(L), time O(L log L).
    Norms: before the cut to D rows every column has ‖H G Π H B e_j‖² = L·‖G‖² exactly, so with the cut
    E ‖P e_j‖² = 1 (exactly 1 when D = L), and the columns are nearly orthogonal: ‖P θ_d‖ ≈ ‖θ_d‖.
    B, Π, G come from `seed` alone, so (seed, θ_d) is the whole trained state."""

    def __init__(self, D: int, d: int, seed: int = 0):
        super().__init__()
        self.D, self.d, self.seed = D, d, seed
        L = 1 << (max(D, d) - 1).bit_length()  # the next power of 2 >= max(D, d)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("B", torch.randint(0, 2, (L,), generator=g).float() * 2 - 1, persistent=False)
        self.register_buffer("Pi", torch.randperm(L, generator=g), persistent=False)
        self.register_buffer("G", torch.randn(L, generator=g), persistent=False)
        self.register_buffer("Pi_inverse", torch.argsort(self.Pi), persistent=False)
        self.norm = math.sqrt(D * float(self.G.square().sum()))

    def forward(self, theta_d: torch.Tensor) -> torch.Tensor:
        L = self.B.numel()
        x = torch.cat([theta_d, theta_d.new_zeros(L - self.d)])  # (d,) -> (L,)
        x = fwht(self.B * x)  # H B x
        x = fwht(self.G * _Permute.apply(x, self.Pi, self.Pi_inverse))  # H G Π H B x
        return x[:self.D] / self.norm  # (D,)

    def dense(self) -> torch.Tensor:
        """P as a (D, d) matrix, column j = P e_j: for tests and small sizes only."""
        return torch.stack([self(e) for e in torch.eye(self.d)], dim=1)


class IntrinsicGPT(nn.Module):
    """A GPT trained in a random d-dimensional subspace of its D parameters: θ = θ0 + P θ_d.

    The GPT stays plain and frozen: forward builds θ from θ_d and runs the GPT with those weights through
    torch.func.functional_call, so nothing in the model is replaced. Only `theta_d` (d,) is a trainable
    parameter; `train()` sees it like any method's. θ0 is every parameter of the base (wte once: lm_head is
    tied to it), D = model.num_params(). `lr` for θ_d: see the lesson (the scale of P θ_d is ‖θ_d‖)."""

    def __init__(self, model, d: int, seed: int = 0):
        super().__init__()
        self.gpt, self.config = model, model.config
        for p in model.parameters():
            p.requires_grad_(False)
        named = list(model.named_parameters())  # tied lm_head.weight appears once, as transformer.wte.weight
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.register_buffer("theta0", torch.cat([p.detach().reshape(-1) for _, p in named]), persistent=False)
        self.projection = Fastfood(self.theta0.numel(), d, seed)
        self.theta_d = nn.Parameter(torch.zeros(d))  # θ_d = 0: θ = θ0 exactly at step 0

    def weights(self) -> dict[str, torch.Tensor]:
        """θ0 + P θ_d, cut back into the GPT's named tensors."""
        theta = self.theta0 + self.projection(self.theta_d)  # (D,)
        sizes = [math.prod(s) for s in self.shapes]
        return {n: t.view(s) for n, t, s in zip(self.names, theta.split(sizes), self.shapes)}

    def forward(self, idx, targets=None, **kwargs):
        return functional_call(self.gpt, self.weights(), (idx, targets), kwargs)  # tied lm_head follows wte

    def num_params(self, trainable_only=False):
        return self.theta_d.numel() if trainable_only else self.theta0.numel()


def d90(ds, scores, full_score: float, frac: float = 0.9):
    """The smallest d in `ds` (ascending) whose score reaches frac · full_score, or None if none does."""
    return next((d for d, s in zip(ds, scores) if s >= frac * full_score), None)
