"""VeRA (minilora/vera.py): the properties its docstring claims, checked against the paper's equation written with
explicit diagonal matrices (the oracle), its parameter count, its seed-only files, and parity with Hugging Face
PEFT's VeRA in both directions (skipped when peft/transformers are missing)."""
import copy
import json
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import minilora
from minilora import (GPT, PRESETS, CheckpointError, GPTConfig, LoRAConfig, attach, load_adapter, merge,
                      merge_and_unload, save_adapter, unmerge)
from minilora.attach import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from minilora.checkpoint import load_safetensors
from minilora.vera import VeRAConfig, VeRALinear, kaiming_uniform

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)


def tiny(seed=0, biases=True):
    torch.manual_seed(seed)
    model = GPT(CFG).eval()
    if biases:  # GPT-2's init zeroes them; nonzero biases check that the update leaves them alone
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias") and "ln_" not in n:
                    p.normal_(0, 0.1)
    return model


def with_vera(config, seed=0):
    base = tiny(seed)
    return base, attach(copy.deepcopy(base), config)


def tokens(B=3, T=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=1, std=0.5):
    """Nonzero b and d ≠ 0.1, as after training (at init b = 0 and the update is 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".vera_lambda_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def vera_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, VeRALinear)}


def paper(x, m):
    """The oracle: h = W0 x + bias + Λ_b B Λ_d A x with Λ = diag(·) formed, A and B sliced to the layer."""
    W0, bias = m.base_layer.weight, m.base_layer.bias
    d_out, d_in = W0.shape
    p = m.shared[0]
    A, B = p.vera_A[:, :d_in], p.vera_B[:d_out]
    delta = torch.diag(m.vera_lambda_b) @ B @ torch.diag(m.vera_lambda_d) @ A  # (d_out, d_in)
    return F.linear(x, W0 + delta, bias)


CONFIGS = {"c_attn": VeRAConfig(r=16), "all-linear": VeRAConfig(r=16, targets="all-linear"),
           "layers": VeRAConfig(r=16, targets=["c_attn", "c_proj"], layers=[1]), "dropout": VeRAConfig(dropout=0.1)}


# ------------------------------------------------------------------------ the module
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_identity_at_init(case):
    base, model = with_vera(CONFIGS[case])
    assert torch.equal(logits(model, tokens()), logits(base, tokens()))  # b = 0: the update is exactly 0


def test_init_is_peft_s():
    """b = 0, d = d_initial; A (r, max d_in), B (max d_out, r) drawn A first from Generator().manual_seed(seed)."""
    _, model = with_vera(VeRAConfig(r=16, targets="all-linear", projection_prng_key=7, d_initial=0.2))
    g = torch.Generator().manual_seed(7)
    A, B = kaiming_uniform((16, 4 * 32), g), kaiming_uniform((4 * 32, 16), g)  # c_fc out 4C, mlp.c_proj in 4C
    p = model.vera_projections["all"]
    assert torch.equal(p.vera_A, A) and torch.equal(p.vera_B, B)
    assert A.abs().max() <= (6 / 128) ** 0.5 and B.abs().max() <= (6 / 16) ** 0.5  # Kaiming-uniform, fan_in
    assert A.abs().max() > 0.9 * (6 / 128) ** 0.5  # and really spread over the range
    for m in vera_layers(model).values():
        assert torch.equal(m.vera_lambda_b, torch.zeros(m.base_layer.out_features))
        assert torch.equal(m.vera_lambda_d, torch.full((16,), 0.2))


def test_one_shared_pair_sliced_for_each_shape():
    _, model = with_vera(VeRAConfig(r=16, targets="all-linear"))
    assert list(model.vera_projections) == ["all"]
    p = model.vera_projections["all"]
    owned = [n for n, _ in model.named_buffers() if "vera_" in n]
    assert owned == ["vera_projections.all.vera_A", "vera_projections.all.vera_B"]  # once, by the model
    for m in vera_layers(model).values():
        A, B = m.projections()
        d_out, d_in = m.base_layer.weight.shape
        assert A.shape == (16, d_in) and B.shape == (d_out, 16)
        assert A.data_ptr() == p.vera_A.data_ptr() and B.data_ptr() == p.vera_B.data_ptr()  # views, not copies


def test_forward_and_gradients_equal_the_paper_equation():
    _, model = with_vera(VeRAConfig(r=16, targets="all-linear"))
    randomize(model)
    for m in vera_layers(model).values():
        x = torch.randn(2, 5, m.base_layer.in_features)
        g = torch.randn(2, 5, m.base_layer.out_features)
        grads = []
        for fn in (m, lambda x: paper(x, m)):
            (fn(x) * g).sum().backward()
            grads.append([m.vera_lambda_d.grad.clone(), m.vera_lambda_b.grad.clone()])
            model.zero_grad()
        torch.testing.assert_close(m(x), paper(x, m), atol=1e-5, rtol=0)
        for ours, oracle in zip(*grads):
            torch.testing.assert_close(ours, oracle, atol=1e-4, rtol=1e-4)


def test_only_the_vectors_train_and_A_B_stay_the_seed_s():
    _, model = with_vera(VeRAConfig(r=16))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".vera_lambda_d", ".vera_lambda_b")) for n in trainable)
    before = {n: t.clone() for n, t in model.named_parameters() if n in trainable}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(3):
        x = tokens(seed=i)
        model(x, torch.roll(x, -1, 1))[1].backward()
        if i == 0:  # b = 0, so ∂L/∂d = 0 at step 0 (as ∂L/∂A in LoRA), while ∂L/∂b ≠ 0
            c_attn = model.transformer.h[0].attn.c_attn
            assert c_attn.vera_lambda_d.grad.abs().sum() == 0 and c_attn.vera_lambda_b.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    assert all((p - before[n]).abs().max() > 1e-4 for n, p in model.named_parameters() if n in before)
    g = torch.Generator().manual_seed(0)
    p = model.vera_projections["all"]
    assert torch.equal(p.vera_A, kaiming_uniform((16, 32), g)) and torch.equal(p.vera_B, kaiming_uniform((96, 16), g))


def test_projections_follow_the_model_to_another_dtype():
    """Layers reach the pair through the model (a reference, not a copy), so .to() moves it once, for all."""
    _, model = with_vera(VeRAConfig(r=16, targets=["c_attn", "c_proj"]))
    randomize(model)
    x = tokens()
    expected = logits(model, x).double()
    model.double()
    p = model.vera_projections["all"]
    assert p.vera_A.dtype == torch.float64
    assert all(m.projections()[0].data_ptr() == p.vera_A.data_ptr() for m in vera_layers(model).values())
    torch.testing.assert_close(logits(model, x), expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ merging
def test_merge_unmerge_merge_and_unload_exact():
    base, model = with_vera(VeRAConfig(r=16, targets="all-linear"))
    randomize(model)
    x = tokens()
    before = logits(model, x)
    assert not torch.allclose(before, logits(base, x), atol=1e-3)
    expected = {n: paper(torch.eye(m.base_layer.in_features), m).detach().T for n, m in vera_layers(model).items()}
    merge(model)
    for n, m in vera_layers(model).items():  # W0 + Λ_b B Λ_d A (rows of eye @ Wᵀ, minus the bias)
        torch.testing.assert_close(m.base_layer.weight, expected[n] - m.base_layer.bias[:, None], atol=1e-6, rtol=0)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    merge(model)  # idempotent
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())
    unmerge(model)
    unmerge(model)
    for n, m in vera_layers(model).items():
        torch.testing.assert_close(m.base_layer.weight, base.get_submodule(n).weight, atol=1e-6, rtol=0)
    merge_and_unload(model)
    assert not vera_layers(model) and set(model.state_dict()) == set(base.state_dict())
    assert model.vera_projections is None and model.minilora_config is None
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ what trains, and how much
@pytest.mark.parametrize("config, expected", [
    (VeRAConfig(), 4 * (256 + 384)),  # Σ (r + d_out) over tiny's 4 c_attn: lessons/11-vera.md
    (VeRAConfig(targets="all-linear"), 4 * (4 * 256 + 384 + 128 + 512 + 128)),
])
def test_trainable_count_on_tiny_preset(config, expected):
    torch.manual_seed(0)
    model = attach(GPT(PRESETS["tiny"]), config)
    layers = vera_layers(model).values()
    formula = sum(config.r + m.base_layer.out_features for m in layers)  # Σ (r + d_out)
    assert model.num_params(trainable_only=True) == expected == formula
    lora = attach(GPT(PRESETS["tiny"]), LoRAConfig(targets=config.targets)).num_params(trainable_only=True)
    assert lora / expected > 6  # LoRA r 8 trains 16,384 (c_attn) and 65,536 (all-linear)


# ------------------------------------------------------------------------ files
def test_seed_only_adapter_file_is_small_and_loads_exactly(tmp_path):
    _, model = with_vera(VeRAConfig(r=64))
    randomize(model)
    save_adapter(model, tmp_path / "seed")
    save_adapter(attach(tiny(), VeRAConfig(r=64, save_projection=True)), tmp_path / "full")
    n = model.num_params(trainable_only=True)  # 2 · (64 + 96)
    seed_bytes = (tmp_path / "seed" / ADAPTER_WEIGHTS).stat().st_size
    full_bytes = (tmp_path / "full" / ADAPTER_WEIGHTS).stat().st_size
    assert sum(t.numel() for t in load_safetensors(tmp_path / "seed" / ADAPTER_WEIGHTS).values()) == n
    assert seed_bytes < 4 * n + 1024  # the vectors in fp32 and a header, no matrix
    assert full_bytes - seed_bytes >= 4 * (64 * 32 + 96 * 64)  # + A (64, 32) and B (96, 64)
    raw = json.loads((tmp_path / "seed" / ADAPTER_CONFIG).read_text())
    assert raw["projection_prng_key"] == 0 and raw["save_projection"] is False
    fresh = load_adapter(tiny(), tmp_path / "seed")  # A, B drawn again from the seed
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))


def test_stored_projections_are_loaded_not_regenerated(tmp_path):
    """save_projection=True writes A, B (PEFT's base_model.vera_A / vera_B), and loading uses them: a file
    stays right even where the seed would draw other matrices."""
    _, model = with_vera(VeRAConfig(r=16, save_projection=True))
    randomize(model)
    with torch.no_grad():
        model.vera_projections["all"].vera_A.mul_(-2)  # not what seed 0 draws
    save_adapter(model, tmp_path)
    keys = set(load_safetensors(tmp_path / ADAPTER_WEIGHTS))
    assert {"base_model.vera_A", "base_model.vera_B"} <= keys
    fresh = load_adapter(tiny(), tmp_path)
    assert torch.equal(fresh.vera_projections["all"].vera_A, model.vera_projections["all"].vera_A)
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))


def test_loading_onto_a_model_with_another_seed_is_a_clear_error(tmp_path):
    _, model = with_vera(VeRAConfig(r=16))
    save_adapter(randomize(model), tmp_path)
    other = attach(tiny(), VeRAConfig(r=16, projection_prng_key=1))
    with pytest.raises(CheckpointError, match="seed 0.*seed 1"):
        load_adapter(other, tmp_path)


def test_loading_onto_another_rank_or_model_names_the_shapes(tmp_path):
    _, model = with_vera(VeRAConfig(r=16, save_projection=True))
    save_adapter(model, tmp_path)
    with pytest.raises(CheckpointError, match=r"vera_lambda_d: file \(16,\) vs model \(8,\)"):
        load_adapter(attach(tiny(), VeRAConfig(r=8, save_projection=True)), tmp_path)
    wide = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=48, vocab_size=64, block_size=16))
    with pytest.raises(CheckpointError, match=r"base_model.vera_A: file \(16, 32\) vs model \(16, 48\)"):
        load_adapter(wide, tmp_path)


def test_config_json_round_trip_and_peft_fields(tmp_path):
    _, model = with_vera(VeRAConfig(r=16, targets=["c_attn", "c_proj"], layers=[1], projection_prng_key=3,
                                    d_initial=0.2))
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["minilora_method"] == "vera" and raw["peft_type"] == "VERA" and raw["fan_in_fan_out"] is True
    assert VeRAConfig.from_json(raw) == model.minilora_config
    peft_style = {k: v for k, v in raw.items() if not k.startswith("minilora")}
    assert VeRAConfig.from_json(peft_style) == model.minilora_config
    with pytest.raises(CheckpointError, match="bias"):
        VeRAConfig.from_json({**peft_style, "bias": "all"})
    with pytest.raises(ValueError, match="positive"):
        VeRAConfig(r=0)


# ------------------------------------------------------------------------ parity with Hugging Face PEFT
PARITY = {  # case: (minilora config, the same adapter as PEFT's VeraConfig kwargs)
    "c_attn": (VeRAConfig(r=16, projection_prng_key=3), dict(r=16, target_modules=["c_attn"], projection_prng_key=3)),
    "three-shapes": (VeRAConfig(r=16, targets=["c_attn", "c_proj", "c_fc"]),
                     dict(r=16, target_modules=["c_attn", "c_proj", "c_fc"])),
    "layers": (VeRAConfig(r=8, targets=["c_attn", "c_proj"], layers=[1], d_initial=0.3),
               dict(r=8, target_modules=["c_attn", "c_proj"], layers_to_transform=[1], layers_pattern="h",
                    d_initial=0.3)),
}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="transformers not installed: no PEFT parity")
    peft = pytest.importorskip("peft", reason="peft not installed: no PEFT parity")
    transformers.utils.logging.disable_progress_bar()
    directory = tmp_path_factory.mktemp("hf_base")
    tiny(seed=3).save_pretrained(directory, hf=True)
    return directory, transformers, peft


def peft_model(hf_base, case, save_projection=True):
    directory, transformers, peft = hf_base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about save_projection=False
        return peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(directory), peft.VeraConfig(
            fan_in_fan_out=True, save_projection=save_projection, **PARITY[case][1])).eval()


def peft_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("case", PARITY)
def test_projections_and_init_equal_peft_s(case, hf_base):
    """Same seed, same generator, same formula: PEFT's A and B, bit for bit, and the same init logits."""
    theirs = peft_model(hf_base, case)
    ours = attach(GPT.from_pretrained(hf_base[0]), PARITY[case][0])
    p = ours.vera_projections["all"]
    assert torch.equal(p.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(p.vera_B, theirs.base_model.vera_B["default"])
    peft_trainable = {n.removeprefix("base_model.model.").removesuffix(".default"): t
                      for n, t in theirs.named_parameters() if t.requires_grad}
    ours_trainable = {n: t for n, t in ours.named_parameters() if t.requires_grad}
    assert set(peft_trainable) == set(ours_trainable)
    assert all(torch.equal(t, peft_trainable[n]) for n, t in ours_trainable.items())  # b = 0, d = d_initial


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", PARITY)
def test_peft_adapter_loads_in_minilora(case, save_projection, hf_base, tmp_path):
    theirs = peft_model(hf_base, case, save_projection)
    randomize(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert "minilora_method" not in raw and raw["save_projection"] is save_projection
    ours = load_adapter(GPT.from_pretrained(hf_base[0]), tmp_path)
    assert isinstance(ours.minilora_config, VeRAConfig)
    x = tokens()
    assert not torch.allclose(logits(ours, x), logits(GPT.from_pretrained(hf_base[0]), x), atol=1e-3)
    torch.testing.assert_close(logits(ours, x), peft_logits(theirs, x), atol=1e-5, rtol=0)
    assert ours.num_params(trainable_only=True) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("case", PARITY)
def test_minilora_adapter_loads_in_peft(case, save_projection, hf_base, tmp_path):
    directory, transformers, peft = hf_base
    config = copy.deepcopy(PARITY[case][0])
    config.save_projection = save_projection
    model = randomize(attach(GPT.from_pretrained(directory), config))
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about minilora's extra config keys, then ignores them
        theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(directory), tmp_path)
    torch.testing.assert_close(peft_logits(theirs.eval(), tokens()), logits(model, tokens()), atol=1e-5, rtol=0)


def test_gradients_and_merged_weights_equal_peft(hf_base):
    theirs = randomize(peft_model(hf_base, "three-shapes"))
    ours = attach(GPT.from_pretrained(hf_base[0]), PARITY["three-shapes"][0])
    with torch.no_grad():  # the same trained vectors
        peft_params = dict(theirs.named_parameters())
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(peft_params[f"base_model.model.{n}.default"])
    x, w = tokens(), torch.randn(3, 10, CFG.vocab_size, generator=torch.Generator().manual_seed(5))
    (ours(x)[0] * w).sum().backward()
    (theirs(x).logits * w).sum().backward()
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, peft_params[f"base_model.model.{n}.default"].grad, atol=1e-5, rtol=1e-4)
    merge(ours)
    merged = theirs.merge_and_unload()
    for n, m in vera_layers(ours).items():  # HF's Conv1D holds (in, out): ours transposed
        torch.testing.assert_close(m.base_layer.weight, merged.get_submodule(n).weight.T, atol=1e-6, rtol=0)
    assert minilora.METHODS["vera"].lr > minilora.METHODS["lora"].lr
