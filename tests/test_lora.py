"""LoRA (minilora/lora.py): the properties its docstring claims, its parameter count, named adapters,
and parity with Hugging Face PEFT in both directions (skipped when peft/transformers are missing)."""
import copy
import json
import os
import re
import warnings

import pytest
import torch

import minilora
from minilora import (GPT, PRESETS, CheckpointError, GPTConfig, attach, load_adapter, merge, merge_and_unload,
                      save_adapter, unmerge)
from minilora import lora
from minilora.attach import ADAPTER_WEIGHTS
from minilora.checkpoint import load_safetensors
from minilora.lora import LoRAConfig, LoRAEmbedding

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def with_lora(config, seed=0):
    base = tiny(seed)
    model = copy.deepcopy(base)
    attach(model, config)
    return base, model


def tokens(B=3, T=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, adapter="default", seed=1, std=0.1):
    """Nonzero A and B, as after training (at init B = 0 and the adapter does nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if re.search(rf"\.lora_\w+\.{adapter}(\.weight)?$", n):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, lora.LoRALayer)}


CONFIGS = {"c_attn": LoRAConfig(), "all-linear": LoRAConfig(targets="all-linear", r=4),
           "fused_qv": LoRAConfig(fused_qkv=["q", "v"]), "embedding": LoRAConfig(embedding=True)}


# ------------------------------------------------------------------------ the module
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_identity_at_init(case):
    base, model = with_lora(CONFIGS[case])
    assert torch.equal(logits(model, tokens()), logits(base, tokens()))  # B = 0 (A = 0 for wte): exactly


def test_b_gets_gradient_at_init_a_does_not():
    _, model = with_lora(LoRAConfig())
    x = tokens()
    model(x, torch.roll(x, -1, 1))[1].backward()
    m = model.transformer.h[0].attn.c_attn
    assert m.lora_B["default"].weight.grad.abs().sum() > 0  # ∂L/∂B = s·g·(Ax)ᵀ, A ≠ 0
    assert m.lora_A["default"].weight.grad.abs().sum() == 0  # ∂L/∂A = s·Bᵀ g·xᵀ, B = 0


@pytest.mark.parametrize("case", ["c_attn", "all-linear", "fused_qv"])
def test_merge_unmerge_merge_and_unload_equal_logits(case):
    base, model = with_lora(CONFIGS[case])
    randomize(model)
    x = tokens()
    before = logits(model, x)
    assert not torch.allclose(before, logits(base, x), atol=1e-3)
    merge(model)
    merged_weights = {n: p.clone() for n, p in model.state_dict().items()}
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    merge(model)  # idempotent: a second merge changes nothing
    assert all(torch.equal(p, merged_weights[n]) for n, p in model.state_dict().items())
    unmerge(model)
    unmerge(model)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(m.base_layer.weight, base.get_submodule(n).weight, atol=1e-6, rtol=0)
    merge_and_unload(model)
    assert not lora_modules(model) and model.minilora_config is None
    assert set(model.state_dict()) == set(base.state_dict())  # a plain GPT again
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)


def test_merge_refuses_nan():
    _, model = with_lora(LoRAConfig())
    m = model.transformer.h[1].attn.c_attn
    with torch.no_grad():
        m.lora_B["default"].weight[0, 0] = float("nan")
    w = m.base_layer.weight.clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        m.merge()
    assert torch.equal(m.base_layer.weight, w) and m.merged is None


def test_eval_does_not_merge():
    """loralib merges on .eval(); here .train()/.eval() never touch a weight."""
    _, model = with_lora(LoRAConfig(targets="all-linear"))
    randomize(model)
    state = {n: p.clone() for n, p in model.state_dict().items()}
    for mode in (True, False, True, False):
        model.train(mode)
        assert all(torch.equal(p, state[n]) for n, p in model.state_dict().items())
        assert all(m.merged is None for m in lora_modules(model).values())


def test_delta_weight_is_scaled_BA():
    _, model = with_lora(LoRAConfig(r=4, alpha=12))
    randomize(model)
    m = model.transformer.h[0].attn.c_attn
    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight  # (r, d_in), (d_out, r)
    assert A.shape == (4, 32) and B.shape == (96, 4) and m.scaling["default"] == 3.0
    torch.testing.assert_close(m.delta_weight("default"), 3.0 * B @ A)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(m(x), m.base_layer(x) + x @ (3.0 * B @ A).T, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ what trains
@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_exactly_the_intended_params_train_and_get_gradients(bias):
    _, model = with_lora(LoRAConfig(targets=["c_attn", "mlp.c_fc"], bias=bias))
    randomize(model)
    wrapped = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    expected = {f"{w}.lora_{ab}.default.weight" for w in wrapped for ab in "AB"}
    if bias == "lora_only":
        expected |= {f"{w}.base_layer.bias" for w in wrapped}
    if bias == "all":
        expected |= {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    x = tokens()
    model(x, torch.roll(x, -1, 1))[1].backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) if n in expected else p.grad is None, n


def lora_param_formula(model):
    """Σ over adapted modules of r·(d_in + d_out); a fused c_attn: g·r·(d_in + C); wte: r·(V + C)."""
    total = 0
    for m in lora_modules(model).values():
        d_out, d_in = m.base_layer.weight.shape
        for name in m.scaling:
            if isinstance(m, LoRAEmbedding):
                total += m.lora_embedding_A[name].shape[0] * (d_out + d_in)  # the table is (V, C)
            elif m.parts[name]:
                g = len(m.parts[name])
                total += g * (m.lora_A[name].weight.shape[0] // g) * (d_in + d_out // 3)
            else:
                total += m.lora_A[name].weight.shape[0] * (d_in + d_out)
    return total


@pytest.mark.parametrize("config, expected", [
    (LoRAConfig(), 16_384),  # 4 layers · 8 · (128 + 384): the worked example in lessons/04-lora.md
    (LoRAConfig(targets="all-linear"), 65_536),  # 4 · 8 · (512 + 256 + 640 + 640)
    (LoRAConfig(fused_qkv=["q", "v"]), 16_384),  # 4 · 2 · 8 · (128 + 128)
    (LoRAConfig(targets=[], embedding=True), 33_792),  # 8 · (4096 + 128)
    (LoRAConfig(bias="lora_only"), 16_384 + 4 * 384),  # + each c_attn bias
])
def test_trainable_count_formula_on_tiny_preset(config, expected):
    torch.manual_seed(0)
    model = attach(GPT(PRESETS["tiny"]), config)
    assert model.num_params(trainable_only=True) == expected
    biases = 4 * 384 if config.bias == "lora_only" else 0
    assert lora_param_formula(model) + biases == expected


# ------------------------------------------------------------------------ choosing modules
@pytest.mark.parametrize("targets, layers, expected", [
    (["c_proj"], None, ["0.attn.c_proj", "0.mlp.c_proj", "1.attn.c_proj", "1.mlp.c_proj"]),
    (["mlp.c_proj"], None, ["0.mlp.c_proj", "1.mlp.c_proj"]),
    (r"transformer\.h\.1\.attn\.c_attn", None, ["1.attn.c_attn"]),
    ("all-linear", [1], ["1.attn.c_attn", "1.attn.c_proj", "1.mlp.c_fc", "1.mlp.c_proj"]),
    (["c_attn"], [0], ["0.attn.c_attn"]),
])
def test_targets_by_suffix_regex_all_linear_layers(targets, layers, expected):
    _, model = with_lora(LoRAConfig(targets=targets, layers=layers))
    assert sorted(lora_modules(model)) == ["transformer.h." + e for e in expected]


def test_rank_pattern_and_alpha_pattern():
    config = LoRAConfig(targets="all-linear", r=8, alpha=16, rank_pattern={"c_fc": 2, r"h\.1\.attn\.c_attn": 4},
                        alpha_pattern={"mlp.c_proj": 4})
    _, model = with_lora(config)
    mods = lora_modules(model)
    rank = {n: m.lora_A["default"].weight.shape[0] for n, m in mods.items()}
    assert rank["transformer.h.0.mlp.c_fc"] == 2 and rank["transformer.h.1.attn.c_attn"] == 4
    assert rank["transformer.h.0.attn.c_attn"] == 8 and rank["transformer.h.1.mlp.c_proj"] == 8
    assert mods["transformer.h.0.mlp.c_fc"].scaling["default"] == 16 / 2
    assert mods["transformer.h.0.mlp.c_proj"].scaling["default"] == 4 / 8
    assert mods["transformer.h.0.attn.c_proj"].scaling["default"] == 16 / 8
    # PEFT's rule: the first key that matches wins
    _, model = with_lora(LoRAConfig(rank_pattern={"c_attn": 2, r"h\.0\.attn\.c_attn": 5}))
    assert {m.lora_A["default"].weight.shape[0] for m in lora_modules(model).values()} == {2}


def test_rslora_scaling():
    _, plain = with_lora(LoRAConfig(r=16, alpha=8))
    _, rs = with_lora(LoRAConfig(r=16, alpha=8, use_rslora=True))
    assert plain.transformer.h[0].attn.c_attn.scaling["default"] == 8 / 16
    assert rs.transformer.h[0].attn.c_attn.scaling["default"] == 8 / 4  # alpha / sqrt(r)


# ------------------------------------------------------------------------ fused q, k, v and the embedding
def test_fused_qkv_q_v_changes_only_q_and_v_slices():
    r, C = 4, 32
    _, model = with_lora(LoRAConfig(r=r, alpha=8, fused_qkv=["q", "v"]))
    randomize(model)
    m = model.transformer.h[0].attn.c_attn
    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
    assert A.shape == (2 * r, C) and B.shape == (2 * C, r)  # rows for k are absent, not zero
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        out, base = m(x), m.base_layer(x)
    assert torch.equal(out[..., C:2 * C], base[..., C:2 * C])  # k: untouched, exactly
    # hand-computed reference: q += s·B_q A_q x, v += s·B_v A_v x, each pair its own rank-r LoRA
    s = 8 / r
    Aq, Av, Bq, Bv = A[:r], A[r:], B[:C], B[C:]
    torch.testing.assert_close(out[..., :C], base[..., :C] + s * x @ Aq.T @ Bq.T, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[..., 2 * C:], base[..., 2 * C:] + s * x @ Av.T @ Bv.T, atol=1e-6, rtol=0)


def test_embedding_lora_changes_the_lookup_only():
    base, model = with_lora(LoRAConfig(targets=[], embedding=True, r=4, alpha=4))
    randomize(model)
    wte = model.transformer.wte
    assert isinstance(wte, LoRAEmbedding) and wte.tied
    assert model.lm_head.weight is wte.base_layer.weight  # the head still reads W0
    A, B = wte.lora_embedding_A["default"], wte.lora_embedding_B["default"]  # (r, V), (C, r)
    idx = tokens()
    torch.testing.assert_close(wte(idx), base.transformer.wte(idx) + (B @ A).T[idx], atol=1e-6, rtol=0)
    assert not torch.allclose(logits(model, idx), logits(base, idx))
    with pytest.raises(ValueError, match="tied to lm_head"):
        merge(model)


# ------------------------------------------------------------------------ several adapters
def two_adapters():
    base, model = with_lora(LoRAConfig())
    lora.add_adapter(model, "b", LoRAConfig(targets="all-linear", r=4, embedding=True))
    randomize(model, "default", seed=1)
    randomize(model, "b", seed=2)
    return base, model


def alone(adapter, config, source, seed=0):
    """A fresh model with only `adapter`'s tensors from `source`, as 'default'."""
    _, model = with_lora(config, seed)
    own = rf"\.{adapter}(?=\.weight$|$)"
    src = {re.sub(own, ".default", n): p for n, p in source.named_parameters() if re.search(own, n)}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(src[n])
    return model


def test_multi_adapter_add_set_disable_delete():
    base, model = two_adapters()
    x = tokens()
    assert model.minilora_config.adapter_name == "default"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n or n.endswith(".b"))
    l_default = logits(model, x)
    torch.testing.assert_close(l_default, logits(alone("default", LoRAConfig(), model), x), atol=1e-6, rtol=0)
    lora.set_adapter(model, "b")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if re.search(r"\.b(\.weight)?$", n)}
    b_config = LoRAConfig(targets="all-linear", r=4, embedding=True)
    torch.testing.assert_close(logits(model, x), logits(alone("b", b_config, model), x), atol=1e-6, rtol=0)
    with lora.disable_adapters(model):
        assert torch.equal(logits(model, x), logits(base, x))
    lora.delete_adapter(model, "b")
    assert model.minilora_config.adapter_name == "default"
    assert not any(".b." in n for n, _ in model.named_parameters())
    torch.testing.assert_close(logits(model, x), l_default, atol=0, rtol=0)
    with pytest.raises(ValueError, match="only adapter"):
        lora.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="no adapter named"):
        lora.set_adapter(model, "nope")
    merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        lora.add_adapter(model, "c", LoRAConfig())


def test_disable_adapters_keeps_trained_biases():
    base, model = with_lora(LoRAConfig(bias="lora_only"))
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.base_layer.bias += 0.5  # as if trained
    with lora.disable_adapters(model):
        assert not torch.allclose(logits(model, tokens()), logits(base, tokens()))


def test_save_the_active_named_adapter_and_load_it_as_default(tmp_path):
    _, model = two_adapters()
    lora.set_adapter(model, "b")
    save_adapter(model, tmp_path)
    assert not any(".b." in k for k in load_safetensors(tmp_path / ADAPTER_WEIGHTS))  # PEFT's keys: no name
    fresh = load_adapter(tiny(), tmp_path)
    assert fresh.minilora_config.adapter_name == "default"
    torch.testing.assert_close(logits(fresh, tokens()), logits(model, tokens()), atol=1e-6, rtol=0)


def test_mixed_batch_rows_equal_single_adapter_runs():
    base, model = two_adapters()
    rows = ["default", "b", "__base__", "b"]
    x = tokens(B=4)
    with lora.adapter_rows(model, rows):
        mixed = logits(model, x)
    assert all(m.rows is None for m in lora_modules(model).values())
    single = {"default": logits(model, x), "__base__": logits(base, x)}
    lora.set_adapter(model, "b")
    single["b"] = logits(model, x)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], single[name][i], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no adapter named"):
        with lora.adapter_rows(model, ["default", "zzz", "b", "b"]):
            pass


def test_weighted_combination_linear_is_exact():
    _, model = with_lora(LoRAConfig(r=8))
    lora.add_adapter(model, "b", LoRAConfig(targets=["c_attn", "mlp.c_proj"], r=4, alpha=3, fused_qkv=["k"]))
    randomize(model, "default", seed=1)
    randomize(model, "b", seed=2)
    lora.add_weighted_adapter(model, ["default", "b"], [0.7, -0.3], "mix", combination="linear")
    for n, m in lora_modules(model).items():
        want = sum(w * m.delta_weight(a) for a, w in [("default", 0.7), ("b", -0.3)] if a in m.scaling)
        torch.testing.assert_close(m.delta_weight("mix"), want, atol=1e-6, rtol=0)
    c_attn = model.transformer.h[0].attn.c_attn
    assert c_attn.lora_A["mix"].weight.shape[0] == 8 + 4  # ranks concatenate
    assert not model.transformer.h[0].mlp.c_proj.lora_A["mix"].weight.requires_grad  # added, not active


@pytest.mark.parametrize("rank", [12, 3])
def test_weighted_combination_svd(rank):
    _, model = with_lora(LoRAConfig(r=8))
    lora.add_adapter(model, "b", LoRAConfig(r=4))
    randomize(model, "default", seed=1)
    randomize(model, "b", seed=2)
    lora.add_weighted_adapter(model, ["default", "b"], [0.5, 2.0], "svd", combination="svd", r=rank)
    for m in lora_modules(model).values():
        want = 0.5 * m.delta_weight("default") + 2.0 * m.delta_weight("b")  # rank ≤ 8 + 4
        got = m.delta_weight("svd")
        assert m.lora_A["svd"].weight.shape[0] == rank
        S = torch.linalg.svdvals(want)
        # Eckart-Young: the error of the best rank-k approximation is the norm of the dropped values
        torch.testing.assert_close(torch.linalg.norm(got - want), torch.linalg.norm(S[rank:]), atol=1e-5, rtol=1e-4)
        if rank >= 12:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ files
@pytest.mark.parametrize("config", [LoRAConfig(targets="all-linear", bias="lora_only"),
                                    LoRAConfig(fused_qkv=["q", "v"], rank_pattern={r"h\.1\.attn\.c_attn": 2}),
                                    LoRAConfig(embedding=True, layers=[1], use_rslora=True)])
def test_save_load_identical_logits_and_only_adapter_tensors(config, tmp_path):
    _, model = with_lora(config)
    randomize(model)
    save_adapter(model, tmp_path)
    saved = load_safetensors(tmp_path / ADAPTER_WEIGHTS)
    assert all(k.startswith("base_model.model.") and (".lora_" in k or k.endswith("base_layer.bias"))
               for k in saved)
    assert len(saved) == len(minilora.adapter_state_dict(model))
    fresh = load_adapter(tiny(), tmp_path)
    assert fresh.minilora_config == config
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))


def test_load_refuses_wrong_model_and_truncated_file(tmp_path):
    _, model = with_lora(LoRAConfig())
    save_adapter(model, tmp_path)
    torch.manual_seed(0)
    wider = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=48, vocab_size=64, block_size=16))
    with pytest.raises(CheckpointError, match="made for another model"):
        load_adapter(wider, tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_adapter(tiny(), tmp_path)


def test_config_json_round_trip_and_peft_fields():
    config = LoRAConfig(r=4, alpha=8, targets="all-linear", layers=[0], rank_pattern={"c_fc": 2},
                        embedding=True, fused_qkv=["q", "v"])
    raw = json.loads(json.dumps(config.to_json()))
    assert LoRAConfig.from_json(raw) == config
    assert raw["peft_type"] == "LORA" and raw["lora_alpha"] == 8 and raw["fan_in_fan_out"] is True
    assert raw["rank_pattern"]["c_attn"] == 8  # PEFT sees a fused q, v c_attn as one rank-2r LoRA
    peft_style = {"peft_type": "LORA", "r": 4, "lora_alpha": 32, "lora_dropout": 0.1, "bias": "none",
                  "target_modules": ["c_attn", "wte"], "layers_to_transform": None, "rank_pattern": {}}
    assert LoRAConfig.from_json(peft_style) == LoRAConfig(r=4, alpha=32, dropout=0.1, targets=["c_attn"],
                                                          embedding=True)
    with pytest.raises(CheckpointError, match="use_dora"):
        LoRAConfig.from_json({**peft_style, "use_dora": True})


# ------------------------------------------------------------------------ parity with Hugging Face PEFT
PARITY = {  # case: (minilora config, the same adapter as PEFT's LoraConfig kwargs)
    "c_attn": (LoRAConfig(r=4, alpha=8), dict(r=4, lora_alpha=8, target_modules=["c_attn"])),
    "all-linear": (LoRAConfig(r=4, alpha=8, targets="all-linear"),
                   dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "rslora": (LoRAConfig(r=4, alpha=8, use_rslora=True), dict(r=4, lora_alpha=8, use_rslora=True,
                                                                target_modules=["c_attn"])),
    "rank_pattern": (LoRAConfig(r=4, alpha=8, targets="all-linear", rank_pattern={"c_fc": 2},
                                alpha_pattern={r"h\.1\.attn\.c_proj": 3}),
                     dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"c_fc": 2},
                          alpha_pattern={r"h\.1\.attn\.c_proj": 3})),
    "embedding+layers": (LoRAConfig(r=4, alpha=8, layers=[1], embedding=True),
                         dict(r=4, lora_alpha=8, target_modules=r"(?:.*\.h\.1\.attn\.c_attn)|transformer\.wte")),
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


def peft_logits(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx).logits


@pytest.mark.parametrize("case", [*PARITY, "fused_qv"])
def test_minilora_adapter_loads_in_peft(case, hf_base, tmp_path):
    directory, transformers, peft = hf_base
    config = LoRAConfig(r=4, alpha=8, fused_qkv=["q", "v"]) if case == "fused_qv" else PARITY[case][0]
    model = attach(GPT.from_pretrained(directory), config)
    randomize(model)
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about minilora's extra config keys, then ignores them
        theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(directory), tmp_path)
    ours = logits(model, tokens())
    assert not torch.allclose(ours, logits(GPT.from_pretrained(directory), tokens()), atol=1e-3)
    torch.testing.assert_close(peft_logits(theirs, tokens()), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", PARITY)
def test_peft_adapter_loads_in_minilora(case, hf_base, tmp_path):
    directory, transformers, peft = hf_base
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf, peft.LoraConfig(fan_in_fan_out=True, lora_dropout=0.0, **PARITY[case][1]))
        randomize(theirs)
        theirs.save_pretrained(tmp_path)
    ours = load_adapter(GPT.from_pretrained(directory), tmp_path)
    torch.testing.assert_close(logits(ours, tokens()), peft_logits(theirs, tokens()), atol=1e-5, rtol=0)
    assert ours.num_params(trainable_only=True) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_add_adapter_refuses_configs_that_initialize_at_attach():
    from minilora.lora_fa import LoRAFAConfig
    from minilora.pissa import PiSSAConfig
    model = with_lora(LoRAConfig())
    for config in (LoRAFAConfig(), PiSSAConfig()):
        with pytest.raises(ValueError, match="fresh model"):
            lora.add_adapter(model, "other", config)


def test_add_adapter_on_a_model_in_eval_mode_adds_eval_modules():
    """The new adapter's dropout takes the model's mode (attach.modules_take_the_mode), so it is off at inference."""
    from minilora.lora import add_adapter
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=16))
    attach(model, LoRAConfig(r=2, targets=["c_attn"])).eval()
    add_adapter(model, "other", LoRAConfig(r=2, targets=["c_attn", "c_fc"], dropout=0.5))
    assert not any(m.training for m in model.modules())
