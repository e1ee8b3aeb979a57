"""Tied-LoRA (minilora/tied_lora.py): the properties its docstring claims: identity at init in every configuration,
the tied pair really is one tensor (its gradient is the sum of every layer's), the two tying rules for layers of
different shapes, the parameter-count formula, files, merging, and that frozen A, B with trained u, v is VeRA."""
import copy
import json

import pytest
import torch

from minilora import (GPT, PRESETS, CheckpointError, GPTConfig, attach, load_adapter, merge, merge_and_unload,
                      save_adapter, unmerge)
from minilora.attach import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from minilora.checkpoint import load_safetensors
from minilora.tied_lora import TiedLoRAConfig
from minilora.vera import Projections, VeRAConfig, VeRALinear

CFG = GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=64, block_size=16)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def with_tied(config, seed=0):
    base = tiny(seed)
    return base, attach(copy.deepcopy(base), config)


def tokens(B=3, T=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, VeRALinear)}


def randomize(model, seed=1, std=0.3, frozen_pairs=True):
    """Every trained tensor (and the frozen A, B too, unless frozen_pairs=False) random, as after training."""
    g = torch.Generator().manual_seed(seed)
    frozen = list(model.vera_projections.buffers()) if frozen_pairs else []
    with torch.no_grad():
        for t in [p for p in model.parameters() if p.requires_grad] + frozen:
            t.copy_(torch.randn(t.shape, generator=g) * std)
    return model


def step(model, lr=1e-2, seed=0):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    x = tokens(seed=seed)
    model(x, torch.roll(x, -1, 1))[1].backward()
    opt.step()
    opt.zero_grad()
    model.eval()


FLAGS = ("train_A", "train_B", "train_u", "train_v")
CONFIGS = {  # name: which of A, B, u, v train
    "all": (1, 1, 1, 1), "A,B (tied LoRA)": (1, 1, 0, 0), "u,v (VeRA)": (0, 0, 1, 1), "B,u,v": (0, 1, 1, 1),
    "A,u": (1, 0, 1, 0), "u": (0, 0, 1, 0), "A": (1, 0, 0, 0),
}


def config(case, **kw):
    return TiedLoRAConfig(**dict(zip(FLAGS, map(bool, CONFIGS[case]))), **kw)


# ------------------------------------------------------------------------ init
@pytest.mark.parametrize("tie", ["module", "all"])
@pytest.mark.parametrize("case", CONFIGS)
def test_identity_at_init(case, tie):
    base, model = with_tied(config(case, targets="all-linear", tie=tie))
    assert torch.equal(logits(model, tokens()), logits(base, tokens()))


@pytest.mark.parametrize("case, zero", [("all", "v"), ("A,B (tied LoRA)", "B"), ("u,v (VeRA)", "v"),
                                        ("A,u", "u"), ("u", "u"), ("A", "A")])
def test_the_outermost_trained_factor_starts_at_zero(case, zero):
    _, model = with_tied(config(case))
    m = model.transformer.h[0].attn.c_attn
    A, B = m.projections()
    values = {"A": A, "B": B, "u": m.vera_lambda_d, "v": m.vera_lambda_b}
    assert [k for k, t in values.items() if not t.any()] == [zero]  # only that one is 0
    for k, on in zip("ABuv", CONFIGS[case]):
        if k in "uv" and not on:  # a frozen vector is 1 and does not train
            assert torch.equal(values[k], torch.ones_like(values[k])) and not values[k].requires_grad
    if CONFIGS[case][2] and zero != "u":
        assert torch.equal(m.vera_lambda_d, torch.full((8,), 0.1))  # u = d_initial, as VeRA's d


def test_config_errors():
    with pytest.raises(ValueError, match="nothing would train"):
        TiedLoRAConfig(train_A=False, train_B=False, train_u=False, train_v=False)
    with pytest.raises(ValueError, match="tie="):
        TiedLoRAConfig(tie="layer")


# ------------------------------------------------------------------------ tying
def test_tied_parameters_are_one_tensor():
    """One vera_A and one vera_B Parameter for all blocks' c_attn; each layer reads it (no copy); one step moves
    every layer's ΔW; the tied gradient is the sum of the gradients each layer gives its own untied copy."""
    _, model = with_tied(TiedLoRAConfig())
    randomize(model)
    tied = [n for n, p in model.named_parameters() if n.startswith("vera_projections")]
    assert tied == ["vera_projections.attn_c_attn.vera_A", "vera_projections.attn_c_attn.vera_B"]
    p = model.vera_projections["attn_c_attn"]
    assert all(m.projections()[0].data_ptr() == p.vera_A.data_ptr() for m in layers(model).values())

    untied = copy.deepcopy(model)  # each layer gets its own copy of the pair: that is LoRA
    copies = []
    for m in layers(untied).values():
        own = copy.deepcopy(m.shared[0])
        m.shared = (own,)
        copies.append(own)
    x = tokens()
    for mod in (model, untied):
        mod(x, torch.roll(x, -1, 1))[1].backward()
    for name in ("vera_A", "vera_B"):
        summed = sum(getattr(c, name).grad for c in copies)
        torch.testing.assert_close(getattr(p, name).grad, summed, atol=1e-6, rtol=1e-5)
    model.zero_grad()

    before = {n: m.delta_weight("default").detach().clone() for n, m in layers(model).items()}
    with torch.no_grad():  # u, v out of the way: a step on A, B alone must reach every layer
        for m in layers(model).values():
            m.vera_lambda_d.requires_grad_(False), m.vera_lambda_b.requires_grad_(False)
    step(model)
    for n, m in layers(model).items():
        assert (m.delta_weight("default") - before[n]).abs().max() > 1e-6, f"{n} did not move"


def test_tie_module_gives_each_kind_of_target_its_own_pair():
    _, model = with_tied(TiedLoRAConfig(targets="all-linear", tie="module"))
    C = CFG.n_embd
    shapes = {g: (tuple(p.vera_A.shape), tuple(p.vera_B.shape)) for g, p in model.vera_projections.items()}
    assert shapes == {"attn_c_attn": ((8, C), (3 * C, 8)), "attn_c_proj": ((8, C), (C, 8)),
                      "mlp_c_fc": ((8, C), (4 * C, 8)), "mlp_c_proj": ((8, 4 * C), (C, 8))}
    for n, m in layers(model).items():  # every block's module of a kind reads that kind's pair, whole
        p = model.vera_projections[n.split(".", 3)[3].replace(".", "_")]
        A, B = m.projections()
        assert A.data_ptr() == p.vera_A.data_ptr() and A.shape == p.vera_A.shape and B.shape == p.vera_B.shape


def test_tie_all_shares_one_pair_sliced_from_the_largest():
    """tie="all" (VeRA's rule): one A (r, 4C), B (4C, r); attn.c_proj (C outputs) reads B[:C], the rows that c_attn's
    q reads, so a step that only c_proj's output drives changes c_attn's update too."""
    _, model = with_tied(TiedLoRAConfig(targets=["c_attn", "c_proj"], tie="all"))
    p = model.vera_projections["all"]
    assert list(model.vera_projections) == ["all"] and p.vera_A.shape == (8, 4 * 32) and p.vera_B.shape == (96, 8)
    c_attn, c_proj = model.transformer.h[0].attn.c_attn, model.transformer.h[0].attn.c_proj
    assert c_proj.projections()[1].shape == (32, 8) and c_attn.projections()[1].shape == (96, 8)
    assert c_proj.projections()[1].data_ptr() == c_attn.projections()[1].data_ptr()
    randomize(model)
    before = c_attn.delta_weight("default").detach().clone()
    x = torch.randn(2, 5, 32)
    c_proj(x).sum().backward()  # a loss through c_proj only
    assert p.vera_B.grad[32:].abs().sum() == 0 and p.vera_B.grad[:32].abs().sum() > 0
    with torch.no_grad():
        p.vera_B -= 0.1 * p.vera_B.grad
    delta = c_attn.delta_weight("default").detach() - before
    assert delta[:32].abs().max() > 0 and delta[32:].abs().max() == 0  # c_attn's q rows moved, k and v not


# ------------------------------------------------------------------------ the VeRA configuration
@pytest.mark.parametrize("targets, tie", [(["c_attn"], "module"), ("all-linear", "all")])
def test_frozen_A_B_with_trained_u_v_equals_vera(targets, tie, tmp_path):
    base = tiny()
    vera = attach(copy.deepcopy(base), VeRAConfig(r=32, targets=targets, projection_prng_key=5))
    tied = attach(copy.deepcopy(base), TiedLoRAConfig(r=32, targets=targets, projection_prng_key=5, tie=tie,
                                                      train_A=False, train_B=False))
    pv, pt = (next(iter(m.vera_projections.values())) for m in (vera, tied))
    assert torch.equal(pv.vera_A, pt.vera_A) and torch.equal(pv.vera_B, pt.vera_B)  # the same A, B from the seed
    assert [(n, p.shape) for n, p in vera.named_parameters() if p.requires_grad] == \
           [(n, p.shape) for n, p in tied.named_parameters() if p.requires_grad]  # the same u=d, v=b vectors
    assert all(torch.equal(a, b) for a, b in zip(vera.parameters(), tied.parameters()))  # the same init
    randomize(vera, frozen_pairs=False)
    with torch.no_grad():
        for a, b in zip(vera.parameters(), tied.parameters()):
            b.copy_(a)
    assert torch.equal(logits(tied, tokens()), logits(vera, tokens()))
    save_adapter(vera, tmp_path / "vera")
    save_adapter(tied, tmp_path / "tied")
    sv, st = (load_safetensors(tmp_path / d / ADAPTER_WEIGHTS) for d in ("vera", "tied"))
    assert sv.keys() == st.keys() and all(torch.equal(sv[k], st[k]) for k in sv)  # the same file tensors


# ------------------------------------------------------------------------ what trains, and how much
def formula(config, model):
    """Σ over pairs of train_A·r·d_in + train_B·d_out·r, + Σ over layers of train_u·r + train_v·d_out."""
    r = config.r
    pairs = sum(config.train_A * r * p.vera_A.size(1) + config.train_B * p.vera_B.size(0) * r
                for p in model.vera_projections.values())
    return pairs + sum(config.train_u * r + config.train_v * m.base_layer.out_features for m in layers(model).values())


@pytest.mark.parametrize("cfg, expected", [  # tiny: 4 blocks, C 128; c_attn 128 -> 384 (lessons/12-tied-lora.md)
    (TiedLoRAConfig(), 8 * 128 + 384 * 8 + 4 * (8 + 384)),  # 5,664
    (config("A,B (tied LoRA)"), 8 * 128 + 384 * 8),  # 4,096: one LoRA adapter's worth, for all 4 blocks
    (config("u,v (VeRA)"), 4 * (8 + 384)),  # 1,568
    (TiedLoRAConfig(targets="all-linear"), 3 * 8 * 128 + 8 * 512 + (384 + 128 + 512 + 128) * 8  # 4 pairs: A's, B's
     + 4 * (4 * 8 + 384 + 128 + 512 + 128)),  # 21,120
    (TiedLoRAConfig(targets="all-linear", tie="all"), 8 * 512 + 512 * 8 + 4 * (4 * 8 + 384 + 128 + 512 + 128)),
])
def test_trainable_count_on_tiny_preset(cfg, expected):
    torch.manual_seed(0)
    model = attach(GPT(PRESETS["tiny"]), cfg)
    assert model.num_params(trainable_only=True) == expected == formula(cfg, model)


# ------------------------------------------------------------------------ merging and files
@pytest.mark.parametrize("tie", ["module", "all"])
def test_merge_unmerge_merge_and_unload_exact(tie):
    base, model = with_tied(TiedLoRAConfig(targets="all-linear", tie=tie))
    randomize(model)
    x = tokens()
    before = logits(model, x)
    assert not torch.allclose(before, logits(base, x), atol=1e-3)
    for m in layers(model).values():
        A, B = m.projections()
        m.expected = (m.base_layer.weight + torch.diag(m.vera_lambda_b) @ B @ torch.diag(m.vera_lambda_d) @ A).detach()
    merge(model)
    merge(model)  # idempotent
    for m in layers(model).values():
        torch.testing.assert_close(m.base_layer.weight, m.expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    unmerge(model)
    for n, m in layers(model).items():
        torch.testing.assert_close(m.base_layer.weight, base.get_submodule(n).weight, atol=1e-6, rtol=0)
    merge_and_unload(model)
    assert not layers(model) and set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)


def test_frozen_factors_are_regenerated_and_trained_ones_saved(tmp_path):
    _, model = with_tied(config("B,u,v", projection_prng_key=4))
    randomize(model, frozen_pairs=False)
    save_adapter(model, tmp_path)
    keys = set(load_safetensors(tmp_path / ADAPTER_WEIGHTS))
    assert "base_model.model.vera_projections.attn_c_attn.vera_B" in keys  # trained: in the file
    assert not [k for k in keys if "vera_A" in k]  # frozen: drawn again from seed 4
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["minilora_method"] == "tied_lora" and "peft_type" not in raw
    assert TiedLoRAConfig.from_json(raw) == model.minilora_config
    fresh = load_adapter(tiny(), tmp_path)
    assert isinstance(fresh.minilora_config, TiedLoRAConfig)
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))
    other = attach(tiny(), config("B,u,v", projection_prng_key=5))
    with pytest.raises(CheckpointError, match="seed 4.*seed 5"):
        load_adapter(other, tmp_path)  # its frozen A is another matrix


def test_save_projection_stores_each_frozen_pair(tmp_path):
    _, model = with_tied(config("u,v (VeRA)", targets=["c_attn", "mlp.c_proj"], save_projection=True))
    save_adapter(randomize(model), tmp_path)
    keys = set(load_safetensors(tmp_path / ADAPTER_WEIGHTS))
    assert {"base_model.vera_A.attn_c_attn", "base_model.vera_B.mlp_c_proj"} <= keys
    assert isinstance(model.vera_projections["mlp_c_proj"], Projections)
    fresh = load_adapter(tiny(), tmp_path)
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))
