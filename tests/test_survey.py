"""Checked answers to the exercises of lessons/16-survey.md.

Each exercise builds one variant of the LoRA family on top of minilora/lora.py (a LoRALinear with its
lora_A (r, d_in), lora_B (d_out, r) and scaling) or minilora/nf4.py, in a few lines. The answer sits next
to a test of the property the variant's paper relies on. Read the exercise in the lesson first."""
import math

import torch
import torch.nn as nn

from minilora.lora import LoRALinear
from minilora.nf4 import NF4_CODE, quantize_blockwise

D_IN, D_OUT, R = 24, 16, 4


def lora_layer(r=R, seed=0, nonzero_b=True):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(D_IN, D_OUT))
    layer.add("default", r=r, alpha=2 * r)
    if nonzero_b:  # a trained-looking adapter: B = 0 at init would make every ΔW zero
        nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    return layer


def x_batch(seed=1, n=5):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ DyLoRA (Valipour et al. 2022)
def dylora_update(layer, x, b):
    """Answer: the rank-b truncation h_b = s · B[:, :b] A[:b] x (one adapter serves every rank b ≤ r)."""
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    return layer.scaling["default"] * (x @ A[:b].T) @ B[:, :b].T  # (n, d_in) @ (d_in, b) @ (b, d_out)


def test_dylora_full_rank_truncation_is_lora_and_lower_ranks_train_only_their_prefix():
    layer, x = lora_layer(), x_batch()
    assert torch.allclose(dylora_update(layer, x, R), layer.update(x, "default"), atol=1e-6)
    dylora_update(layer, x, 2).sum().backward()
    grad_a = layer.lora_A["default"].weight.grad
    assert grad_a[2:].abs().sum() == 0 and grad_a[:2].abs().sum() > 0


# ------------------------------------------------------------------ Delta-LoRA (Zi et al. 2023)
def delta_lora_step(layer, optimizer, loss, lam):
    """Answer: after the usual step on A, B, also move W0 by λ·s·(B_{t+1}A_{t+1} − B_t A_t)."""
    before = layer.delta_weight("default").detach()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        layer.base_layer.weight += lam * (layer.delta_weight("default") - before)


def test_delta_lora_moves_w0_by_lambda_times_the_change_of_ba():
    layer, x = lora_layer(), x_batch()
    opt = torch.optim.SGD([layer.lora_A["default"].weight, layer.lora_B["default"].weight], lr=0.1)
    w0, ba0 = layer.base_layer.weight.detach().clone(), layer.delta_weight("default").detach()
    delta_lora_step(layer, opt, layer(x).pow(2).mean(), lam=0.5)
    change = layer.delta_weight("default").detach() - ba0
    assert change.abs().max() > 0
    assert torch.allclose(layer.base_layer.weight - w0, 0.5 * change, atol=1e-6)


# ------------------------------------------------------------------ LoHa (Hyeon-Woo et al. 2021, FedPara)
def loha_delta(B1, A1, B2, A2):
    """Answer: ΔW = (B1 A1) ⊙ (B2 A2), a Hadamard product of two rank-r products."""
    return (B1 @ A1) * (B2 @ A2)  # (d_out, r) @ (r, d_in), elementwise with the same


def test_loha_reaches_rank_r_squared_with_the_parameters_of_rank_2r_lora():
    g = torch.Generator().manual_seed(0)
    B1, B2 = torch.randn(D_OUT, 2, generator=g), torch.randn(D_OUT, 2, generator=g)
    A1, A2 = torch.randn(2, D_IN, generator=g), torch.randn(2, D_IN, generator=g)
    assert torch.linalg.matrix_rank(loha_delta(B1, A1, B2, A2)) == 4  # r = 2: r² = 4 = 2r, no gain yet
    B1, B2 = torch.randn(D_OUT, 3, generator=g), torch.randn(D_OUT, 3, generator=g)
    A1, A2 = torch.randn(3, D_IN, generator=g), torch.randn(3, D_IN, generator=g)
    assert torch.linalg.matrix_rank(loha_delta(B1, A1, B2, A2)) == 9 > 2 * 3


# ------------------------------------------------------------------ LoKr / KronA (Edalati et al. 2022)
def kron_apply(C, M, x):
    """Answer: (C ⊗ M) x without forming the Kronecker product: reshape x (n, c_in·m_in) to
    (n, c_in, m_in), then y = C X Mᵀ per row: (c_out, c_in) · (c_in, m_in) · (m_in, m_out)."""
    n = x.size(0)
    X = x.view(n, C.size(1), M.size(1))  # (n, c_in, m_in)
    return torch.einsum("oc,ncm,pm->nop", C, X, M).reshape(n, -1)  # (n, c_out·m_out)


def test_kronecker_adapter_applies_without_materialising_the_product():
    g = torch.Generator().manual_seed(0)
    C, M = torch.randn(4, 6, generator=g), torch.randn(4, 4, generator=g)  # ΔW (16, 24) from 24 + 16 numbers
    x = x_batch()
    assert torch.allclose(kron_apply(C, M, x), x @ torch.kron(C, M).T, atol=1e-5)
    assert torch.linalg.matrix_rank(torch.kron(C, M)) == 16  # full rank from 40 parameters


# ------------------------------------------------------------------ SoRA (Ding et al. 2023)
def sora_prox(g, lr, lam):
    """Answer: the proximal step of the L1 penalty on the gate: soft thresholding."""
    return torch.sign(g) * torch.clamp(g.abs() - lr * lam, min=0)


def sora_prune(layer, gate):
    """Answer: drop the ranks whose gate is zero; fold the gate into B. Returns a plain (B, A)."""
    keep = gate != 0
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    return B[:, keep] * gate[keep], A[keep]  # (d_out, r') , (r', d_in)


def test_sora_soft_threshold_zeroes_small_gates_and_pruning_keeps_outputs():
    g = torch.tensor([0.5, -0.05, 0.02, -0.8])
    gate = sora_prox(g, lr=0.1, lam=1.0)
    assert torch.allclose(gate, torch.tensor([0.4, 0.0, 0.0, -0.7]))
    layer, x = lora_layer(), x_batch()
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    gated = layer.scaling["default"] * (x @ A.T * gate) @ B.T  # h = s · B diag(g) A x
    Bp, Ap = sora_prune(layer, gate)
    assert Ap.size(0) == 2
    assert torch.allclose(layer.scaling["default"] * (x @ Ap.T) @ Bp.T, gated, atol=1e-6)


# ------------------------------------------------------------------ ReLoRA (Lialin et al. 2023)
def relora_restart(layer):
    """Answer: merge ΔW into W0, then start a fresh LoRA (A re-drawn, B = 0): outputs are unchanged,
    and the next ΔW adds new directions (the optimizer state of A, B must be reset too)."""
    layer.merge()
    layer.merged = None  # the merge is permanent: forget it, do not unmerge
    layer.add("default", r=layer.lora_A["default"].weight.size(0), alpha=2 * R)  # A Kaiming, B = 0


def test_relora_restarts_keep_outputs_and_accumulate_rank_beyond_r():
    layer, x = lora_layer(r=2), x_batch()
    w0 = layer.base_layer.weight.detach().clone()
    for k in range(3):
        before = layer(x).detach()
        relora_restart(layer)
        assert torch.allclose(layer(x), before, atol=1e-5)
        nn.init.normal_(layer.lora_B["default"].weight, std=0.5, generator=torch.Generator().manual_seed(k))
    relora_restart(layer)
    assert torch.linalg.matrix_rank(layer.base_layer.weight.detach() - w0) == 3 * 2 + 2  # 4 rank-2 updates


# ------------------------------------------------------------------ IA³ (Liu et al. 2022)
def ia3_merge(linear, l_out):
    """Answer: h = l ⊙ (W x + b) folds into W' = diag(l) W, b' = l ⊙ b."""
    merged = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        merged.weight.copy_(l_out[:, None] * linear.weight)
        merged.bias.copy_(l_out * linear.bias)
    return merged


def test_ia3_scaling_vector_merges_exactly():
    torch.manual_seed(0)
    linear, l_out, x = nn.Linear(D_IN, D_OUT), torch.rand(D_OUT) + 0.5, x_batch()
    assert torch.allclose(ia3_merge(linear, l_out)(x), l_out * linear(x), atol=1e-6)


# ------------------------------------------------------------------ GLoRA (Chavan et al. 2023), weight part
def glora_weight(W0, A_b, A_a, B_b, B_a):
    """Answer: W' = W0 + W0 ⊙ (A_b A_a) + B_b B_a: a low-rank scaling of W0 plus a low-rank shift."""
    return W0 + W0 * (A_b @ A_a) + B_b @ B_a


def test_glora_reparameterises_into_one_weight_and_is_identity_at_zero():
    g = torch.Generator().manual_seed(0)
    W0, x = torch.randn(D_OUT, D_IN, generator=g), x_batch()
    A_b, A_a = torch.randn(D_OUT, 2, generator=g), torch.randn(2, D_IN, generator=g)
    B_b, B_a = torch.randn(D_OUT, 2, generator=g), torch.zeros(2, D_IN)
    assert torch.equal(glora_weight(W0, A_b, torch.zeros(2, D_IN), B_b, B_a), W0)
    W = glora_weight(W0, A_b, A_a, B_b, B_a)
    assert torch.allclose(x @ W.T, x @ W0.T + x @ (W0 * (A_b @ A_a)).T, atol=1e-5)


# ------------------------------------------------------------------ mixtures of LoRA experts (MoLoRA, X-LoRA)
def molora_update(layers, router, x):
    """Answer: h = Σ_k softmax(router x)_k · ΔW_k x over k LoRA experts (token-level soft routing)."""
    weights = torch.softmax(x @ router.T, dim=-1)  # (n, d_in) @ (d_in, k) -> (n, k)
    updates = torch.stack([m.update(x, "default") for m in layers], dim=-1)  # (n, d_out, k)
    return (updates * weights[:, None, :]).sum(-1)


def test_molora_uniform_router_averages_and_saturated_router_picks_one_expert():
    experts, x = [lora_layer(seed=s) for s in range(3)], x_batch()
    uniform = torch.zeros(3, D_IN)  # equal logits: the mean of the three experts
    assert torch.allclose(molora_update(experts, uniform, x),
                          sum(m.update(x, "default") for m in experts) / 3, atol=1e-6)
    row = x[:1]
    router = torch.zeros(3, D_IN)
    router[1] = 100 * row[0] / row[0].norm() ** 2  # logit 100 for expert 1, 0 for the others
    assert torch.allclose(molora_update(experts, router, row), experts[1].update(row, "default"), atol=1e-5)


# ------------------------------------------------------------------ MultiLoRA (Wang et al. 2023)
def test_parallel_loras_are_one_lora_of_the_summed_rank():
    """MultiLoRA runs n LoRAs side by side: Σ_k s_k B_k A_k = [s_1 B_1 ... s_n B_n] [A_1; ...; A_n]."""
    layers, x = [lora_layer(r=2, seed=s) for s in range(3)], x_batch()
    B = torch.cat([m.scaling["default"] * m.lora_B["default"].weight for m in layers], 1)  # (d_out, 6)
    A = torch.cat([m.lora_A["default"].weight for m in layers])  # (6, d_in)
    assert torch.allclose(x @ A.T @ B.T, sum(m.update(x, "default") for m in layers), atol=1e-5)


# ------------------------------------------------------------------ LoRA-drop (Zhou et al. 2024), layer-wise
def lora_drop_keep(outputs: dict, share: float):
    """Answer: rank layers by the mean squared norm of their LoRA output ‖ΔW x‖², keep the smallest set
    whose importance reaches `share` of the total (the rest share one adapter in the paper)."""
    score = {n: o.pow(2).sum(-1).mean().item() for n, o in outputs.items()}
    total, kept, acc = sum(score.values()), [], 0.0
    for n in sorted(score, key=score.get, reverse=True):
        if acc >= share * total:
            break
        kept.append(n)
        acc += score[n]
    return kept


def test_lora_drop_keeps_the_layers_with_the_largest_outputs():
    x = x_batch()
    outputs = {f"h.{i}": lora_layer(seed=i).update(x, "default") * scale
               for i, scale in enumerate([0.01, 3.0, 0.02, 2.0])}
    assert sorted(lora_drop_keep(outputs, share=0.9)) == ["h.1", "h.3"]


# ------------------------------------------------------------------ GaLore (Zhao et al. 2024)
def galore_project(grad, r):
    """Answer: P = top-r left singular vectors of G (d_out, d_in); the optimizer sees Pᵀ G (r, d_in) and the
    update is mapped back by P: G̃ = P Pᵀ G."""
    U, _, _ = torch.linalg.svd(grad, full_matrices=False)
    P = U[:, :r]  # (d_out, r)
    return P @ (P.T @ grad)


def test_galore_projection_is_exact_for_low_rank_gradients_and_rank_r_otherwise():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(D_OUT, 2, generator=g) @ torch.randn(2, D_IN, generator=g)
    assert torch.allclose(galore_project(low, 2), low, atol=1e-4)
    full = torch.randn(D_OUT, D_IN, generator=g)
    assert torch.linalg.matrix_rank(galore_project(full, 3)) == 3


# ------------------------------------------------------------------ LISA (Pan et al. 2024), layer-wise sampling
def lisa_sample(n_layers, gamma, generator):
    """Answer: each period, unfreeze γ of the blocks, drawn uniformly without replacement (embeddings and
    head always train)."""
    return sorted(torch.randperm(n_layers, generator=generator)[:gamma].tolist())


def test_lisa_samples_gamma_distinct_layers_and_covers_all_over_time():
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(50):
        chosen = lisa_sample(8, 2, g)
        assert len(set(chosen)) == 2 and all(0 <= i < 8 for i in chosen)
        seen.update(chosen)
    assert seen == set(range(8))


# ------------------------------------------------------------------ IR-QLoRA (Qin et al. 2024), ICQ
def code_entropy(w, tau, block_size=64):
    idx, _ = quantize_blockwise(w - tau, NF4_CODE, block_size)
    p = torch.bincount(idx.long(), minlength=16).float() / idx.numel()
    return -(p[p > 0] * p[p > 0].log2()).sum().item()


def icq_calibrate(w, block_size=64, candidates=torch.linspace(-0.5, 0.5, 41)):
    """Answer (Information Calibration Quantization): shift the weights by the τ (in units of the block's
    std) that maximises the entropy of the 4-bit codes; τ is stored with the block and added back."""
    std = w.std().item()
    return max((float(c) * std for c in candidates), key=lambda tau: code_entropy(w, tau, block_size))


def test_icq_never_lowers_the_code_entropy():
    w = torch.randn(64 * 32, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.004  # off-centre
    tau = icq_calibrate(w)
    assert code_entropy(w, tau) > code_entropy(w, 0.0) + 0.01  # the off-centre block gains information
    assert code_entropy(w, tau) <= math.log2(16)
    assert tau > 0  # the shift removes the offset, it does not add to it


# ------------------------------------------------------------------ LoraHub (Huang et al. 2023)
def test_lorahub_composition_is_add_weighted_adapter():
    """LoraHub composes trained adapters as Σ w_i B_i A_i and searches w gradient-free; the composition is
    minilora.lora.add_weighted_adapter (combination="linear"). Weight (1, 0) is adapter 1 alone."""
    from minilora import GPT, GPTConfig
    from minilora.lora import LoRAConfig, add_adapter, add_weighted_adapter, set_adapter
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=16)).eval()
    add_adapter(model, "a", LoRAConfig(r=2))
    add_adapter(model, "b", LoRAConfig(r=2))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.3)
    idx = torch.randint(0, 32, (2, 8))
    set_adapter(model, "a")
    ref = model(idx)[0]
    add_weighted_adapter(model, ["a", "b"], [1.0, 0.0], "hub")
    set_adapter(model, "hub")
    assert torch.allclose(model(idx)[0], ref, atol=1e-5)
