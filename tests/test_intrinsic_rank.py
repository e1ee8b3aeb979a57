"""Intrinsic rank and dimension (minilora/intrinsic_rank.py): the spectrum's energy, the subspace similarity
φ of LoRA §7.2 against its definition and its random-subspace expectation, the amplification factor of
LoRA Table 7 on a planted example, LoRA configs at equal budget, and the Fastfood reparametrization
θ = θ0 + P θ_d (against the dense matrix it stands for; exact at θ_d = 0; only θ_d trains; seeded)."""
import copy
import math

import pytest
import torch

from minilora import GPT, GPTConfig, attach, merge
from minilora.data import Example, Task
from minilora.intrinsic_rank import (Fastfood, IntrinsicGPT, amplification, attach_seeded, d90, energy, fwht, hadamard, lora_A,
                                     lora_config, projection_norm, random_similarity, rank_for_energy,
                                     similarity_grid, subspace_similarity, weight_deltas, weight_matrices)
from minilora.train import TrainConfig, train

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def orthonormal(n, k, seed):
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


def randomize_lora(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# ------------------------------------------------------------------------ matrices and spectrum
def test_weight_matrices_split_fused_qkv():
    model = tiny()
    W, C = weight_matrices(model), CFG.n_embd
    x = torch.randn(3, C)
    q, k, v = (model.transformer.h[1].attn.c_attn(x) - model.transformer.h[1].attn.c_attn.bias).split(C, dim=1)
    for name, out in zip("qkv", (q, k, v)):
        assert torch.allclose(x @ W[(1, name)].T, out, atol=1e-6)
    assert W[(0, "o")].shape == (C, C) and W[(0, "fc")].shape == (4 * C, C) and W[(0, "proj")].shape == (C, 4 * C)
    assert len(W) == 6 * CFG.n_layer


def test_weight_deltas_of_a_merged_lora_are_its_update():
    base = tiny()
    model = randomize_lora(attach(copy.deepcopy(base), lora_config("qv", r=4)))
    c_attn = model.transformer.h[0].attn.c_attn
    full = c_attn.delta_weight("default").detach()  # (3C, C)
    merge(model)
    D = weight_deltas(model, base)
    for name, expect in zip("qkv", full.chunk(3)):
        assert torch.allclose(D[(0, name)], expect, atol=1e-6)
    assert torch.count_nonzero(D[(0, "k")]) == 0 and torch.count_nonzero(D[(0, "o")]) == 0


def test_energy_sums_to_one():
    e = energy(torch.randn(20, 12))
    assert e.shape == (12,) and torch.all(e[1:] >= e[:-1]) and abs(float(e[-1]) - 1) < 1e-6


def test_energy_of_a_zero_update_is_an_error():
    with pytest.raises(ValueError, match="zero"):
        energy(torch.zeros(4, 3))


def test_energy_exact_for_planted_rank_k():
    sigma = torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    delta = orthonormal(30, 4, 1) @ torch.diag(sigma) @ orthonormal(20, 4, 2).T  # rank 4, singular values sigma
    e = energy(delta)
    expect = sigma.square().cumsum(0) / sigma.square().sum()
    assert torch.allclose(e[:4].double(), expect, atol=1e-6)
    assert torch.allclose(e[3:], torch.ones(17), atol=1e-6)  # everything after rank k adds nothing
    assert rank_for_energy(e, 1.0) == 4 and rank_for_energy(e, 0.9) == 3  # 34/39 < 0.9 <= 38/39


# ------------------------------------------------------------------------ subspace similarity
def test_phi_in_unit_interval():
    A1, A2 = torch.randn(8, 40), torch.randn(16, 40)
    grid = similarity_grid(A1, A2)
    assert grid.shape == (8, 16) and grid.min() >= 0 and grid.max() <= 1 + 1e-6


def test_phi_of_A_with_itself_is_one():
    A = torch.randn(8, 40)
    for i in (1, 3, 8):
        assert abs(subspace_similarity(A, A, i, i) - 1) < 1e-6


def test_phi_uses_right_singular_vectors():
    """φ compares row spaces (the d_in directions A reads): mixing A's rows leaves φ(·, ·, r, r) = 1; a
    different row space does not."""
    A = torch.randn(4, 30)
    M = torch.randn(4, 4) + 4 * torch.eye(4)  # invertible
    assert abs(subspace_similarity(M @ A, A, 4, 4) - 1) < 1e-6
    assert subspace_similarity(torch.randn(4, 30), A, 4, 4) < 0.9


def test_phi_is_one_when_the_top_direction_is_shared():
    """LoRA Fig. 3's finding planted: A_{r=8}'s top direction lies inside A_{r=64}'s span."""
    d = 40
    U = orthonormal(d, 10, 3).float()
    A8 = torch.diag(torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1])) @ torch.cat([U[:, :1], U[:, 2:9]], 1).T  # top: U[:, 0]
    A16 = torch.diag(torch.linspace(5, 1, 16)) @ torch.cat([U[:, :1], orthonormal(d, 16, 4).float()[:, 1:]], 1).T
    assert subspace_similarity(A8, A16, 1, 16) > 0.99


def test_similarity_grid_matches_subspace_similarity():
    A1, A2 = torch.randn(5, 24), torch.randn(7, 24)
    grid = similarity_grid(A1, A2)
    for i, j in [(1, 1), (2, 7), (5, 3), (4, 4)]:
        assert abs(float(grid[i - 1, j - 1]) - subspace_similarity(A1, A2, i, j)) < 1e-6


def test_phi_of_independent_random_subspaces_matches_expectation():
    """E ‖U1[:, :i]ᵀ U2[:, :j]‖_F² = i·j/d for independent uniform subspaces, so E φ = max(i, j)/d."""
    d, i, j, n = 32, 3, 8, 400
    g = torch.Generator().manual_seed(0)
    phis = [subspace_similarity(torch.randn(i, d, generator=g), torch.randn(j, d, generator=g), i, j)
            for _ in range(n)]
    mean = sum(phis) / n
    assert random_similarity(i, j, d) == max(i, j) / d
    assert abs(mean * min(i, j) - i * j / d) < 0.05 * i * j / d + 3 * torch.tensor(phis).std() / math.sqrt(n)


def test_lora_A_picks_the_projection():
    model = randomize_lora(attach(tiny(), lora_config("qvo", r=3)))
    A = model.transformer.h[1].attn.c_attn.lora_A["default"].weight
    assert torch.equal(lora_A(model, 1, "q"), A[:3]) and torch.equal(lora_A(model, 1, "v"), A[3:])
    assert torch.equal(lora_A(model, 1, "o"), model.transformer.h[1].attn.c_proj.lora_A["default"].weight)


def test_lora_A_refuses_a_projection_without_its_own_A():
    """A plain c_attn LoRA has one A for q, k and v together; a qv one has none for k."""
    from minilora import LoRAConfig
    with pytest.raises(ValueError, match="no A of its own"):
        lora_A(attach(tiny(), LoRAConfig(r=3)), 0, "q")
    with pytest.raises(ValueError, match="no A of its own"):
        lora_A(attach(tiny(), lora_config("qv", r=3)), 0, "k")


# ------------------------------------------------------------------------ LoRA at equal budget
@pytest.mark.parametrize("matrices,r", [("q", 8), ("k", 8), ("v", 8), ("o", 8), ("qk", 4), ("qv", 4), ("qkvo", 2)])
def test_lora_configs_at_equal_budget(matrices, r):
    """LoRA Table 5: r·|matrices| = 8 for each row, so each trains 8 · 2C · n_layer parameters."""
    model = attach(tiny(), lora_config(matrices, r))
    assert model.num_params(trainable_only=True) == 8 * 2 * CFG.n_embd * CFG.n_layer


def test_lora_config_rejects_unknown_matrices():
    with pytest.raises(ValueError, match="qkvo"):
        lora_config("qx", 4)


def test_attach_seeded_inits_are_reproducible_and_independent():
    """Same (config, seed): the same A. r = 8 vs r = 64, or another seed: A's rows are not shared (plain
    torch.manual_seed would give r = 8 and r = 64 the same first rows)."""
    base = tiny()
    a8 = lora_A(attach_seeded(base, lora_config("qv", 8), seed=0), 0, "q")
    assert torch.equal(a8, lora_A(attach_seeded(base, lora_config("qv", 8), seed=0), 0, "q"))
    for other in (attach_seeded(base, lora_config("qv", 16), seed=0), attach_seeded(base, lora_config("qv", 8), seed=1)):
        assert not torch.isclose(lora_A(other, 0, "q")[:8], a8).any()


# ------------------------------------------------------------------------ amplification
def test_amplification_on_a_planted_example():
    """W = diag(10, 8, 6, 4, 2, 1), ΔW = 3·e5 e5ᵀ (rank 1, in a direction W barely uses): ‖Uᵀ W V‖ = W[4, 4] = 2,
    the factor is ‖ΔW‖/2 = 1.5; from W's own top direction ‖Uᵀ W V‖ = 10."""
    W = torch.diag(torch.tensor([10.0, 8, 6, 4, 2, 1]))
    delta = torch.zeros(6, 6)
    delta[4, 4] = 3.0
    out = amplification(delta, W, r=1)
    assert abs(out["delta"] - 2) < 1e-9 and abs(out["W"] - 10) < 1e-9 and abs(out["factor"] - 1.5) < 1e-9
    assert abs(out["norm_W"] - float(W.norm())) < 1e-5 and abs(out["norm_delta"] - 3) < 1e-9
    assert out["random"] < out["W"]


def test_projection_norm_is_the_formula():
    W, U, V = torch.randn(9, 7), orthonormal(9, 2, 5), orthonormal(7, 2, 6)
    assert abs(projection_norm(W, U, V) - float((U.T @ W.double() @ V).norm())) < 1e-9
    assert abs(projection_norm(W, torch.eye(9, dtype=torch.float64), torch.eye(7, dtype=torch.float64))
               - float(W.norm())) < 1e-5


# ------------------------------------------------------------------------ Fastfood and θ = θ0 + P θ_d
@pytest.mark.parametrize("n,block", [(1, 7), (5, 7), (10, 3), (11, 4)])
def test_fwht_equals_hadamard_matrix(n, block):
    x = torch.randn(2 ** n, dtype=torch.float64)
    assert torch.allclose(fwht(x, block), hadamard(n).double() @ x, atol=1e-9)


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        fwht(torch.randn(12))


def test_fastfood_equals_its_dense_formula():
    """P = (H G Π H B)[:D, :d] / sqrt(D·‖G‖²), built as matrices (Π as a permutation matrix)."""
    D, d = 50, 7
    P = Fastfood(D, d, seed=3)
    L = P.B.numel()
    H = hadamard(L.bit_length() - 1)
    Pi = torch.eye(L)[P.Pi]  # (Π x)_k = x[Pi[k]]
    dense = (H @ torch.diag(P.G) @ Pi @ H @ torch.diag(P.B))[:D, :d] / math.sqrt(D * float(P.G.square().sum()))
    assert L == 64 and torch.allclose(P.dense(), dense, atol=1e-5)


def test_projection_column_norms():
    """Columns have norm 1 exactly when D = L, and in expectation when cut to D < L rows."""
    assert torch.allclose(Fastfood(256, 20, seed=0).dense().norm(dim=0), torch.ones(20), atol=1e-5)
    norms = Fastfood(3000, 200, seed=1).dense().norm(dim=0)  # L = 4096
    assert abs(float(norms.square().mean()) - 1) < 0.1
    theta = torch.randn(200)
    assert abs(float(Fastfood(3000, 200, seed=1)(theta).norm() / theta.norm()) - 1) < 0.15


def test_projection_is_reproducible_from_its_seed():
    theta = torch.randn(30)
    a, b, c = Fastfood(500, 30, seed=7), Fastfood(500, 30, seed=7), Fastfood(500, 30, seed=8)
    assert torch.equal(a(theta), b(theta)) and not torch.allclose(a(theta), c(theta))


def test_projection_larger_d_than_D_pads_to_d():
    P = Fastfood(10, 40, seed=0)
    assert P.B.numel() == 64 and P(torch.randn(40)).shape == (10,)


def test_zero_theta_d_gives_theta0_exactly():
    base = tiny()
    model = IntrinsicGPT(copy.deepcopy(base), d=16)
    params = dict(base.named_parameters())
    assert all(torch.equal(w, params[n]) for n, w in model.weights().items())
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    assert torch.equal(model(idx)[0], base(idx)[0])
    assert model.num_params() == base.num_params() and model.num_params(trainable_only=True) == 16


def test_weights_are_theta0_plus_P_theta_d():
    base = tiny()
    model = IntrinsicGPT(copy.deepcopy(base), d=12, seed=2)
    with torch.no_grad():
        model.theta_d.normal_()
    theta0 = torch.cat([p.reshape(-1) for p in base.parameters()])
    theta = torch.cat([w.reshape(-1) for w in model.weights().values()])
    assert torch.allclose(theta, theta0 + model.projection.dense() @ model.theta_d.detach(), atol=1e-5)


def test_tied_lm_head_follows_wte():
    """functional_call ties lm_head to the new wte: the reparametrized GPT equals a plain GPT loaded with θ."""
    model = IntrinsicGPT(tiny(), d=12)
    with torch.no_grad():
        model.theta_d.normal_()
    plain = tiny()
    plain.load_state_dict({**model.weights(), "lm_head.weight": model.weights()["transformer.wte.weight"]})
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(idx)[0], plain(idx)[0], atol=1e-5)


def test_gradients_flow_only_to_theta_d():
    model = IntrinsicGPT(tiny(), d=10)
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    model(idx, idx)[1].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["theta_d"]
    assert model.theta_d.grad is not None and model.theta_d.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.gpt.parameters())


def test_theta_d_gradient_is_P_transpose_times_weight_gradient():
    base = tiny()
    model = IntrinsicGPT(copy.deepcopy(base), d=10)
    idx = torch.randint(0, CFG.vocab_size, (2, 9))
    model(idx, idx)[1].backward()
    base.train()
    base(idx, idx)[1].backward()  # dL/dθ at θ0
    grad = torch.cat([p.grad.reshape(-1) for p in base.parameters()])
    assert torch.allclose(model.theta_d.grad, model.projection.dense().T @ grad, atol=1e-5)


def test_intrinsic_gpt_trains_with_train():
    g = torch.Generator().manual_seed(0)

    def ex():
        p = torch.randint(0, 60, (5,), generator=g).tolist()
        return Example(p, [(p[-1] + 1) % 60, CFG.vocab_size - 1])
    task = Task("toy", "last token + 1", "exact match", [ex() for _ in range(64)], [ex() for _ in range(16)],
                [ex() for _ in range(16)])
    model = IntrinsicGPT(tiny(), d=50)
    record = train(model, task, TrainConfig(steps=15, batch_size=16, lr=0.5, eval_every=15, progress=False,
                                            keep_best=False))
    assert record["trainable_params"] == 50 and model.theta_d.abs().sum() > 0
    assert record["history"][-1]["loss"] < train(IntrinsicGPT(tiny(), d=50), task, TrainConfig(
        steps=1, batch_size=16, lr=0.0, eval_every=1, progress=False))["val"]["loss"]


def test_d90():
    assert d90([10, 100, 1000], [0.1, 0.5, 0.7], full_score=0.75) == 1000
    assert d90([10, 100, 1000], [0.1, 0.5, 0.6], full_score=0.75) is None
    assert d90([10, 100], [0.7, 0.7], full_score=0.75) == 10
