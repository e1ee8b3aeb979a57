"""DoRA (minilora/dora.py): the properties its docstring claims, checked against the paper's equation written
naively (the oracle), its parameter count, and parity with Hugging Face PEFT's DoRA in both directions
(skipped when peft/transformers are missing)."""
import copy
import json
import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import minilora
from minilora import (GPT, PRESETS, CheckpointError, GPTConfig, LoRAConfig, attach, load_adapter, merge,
                      merge_and_unload, save_adapter, unmerge)
from minilora import lora
from minilora.attach import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from minilora.checkpoint import load_safetensors
from minilora.dora import DoRAConfig, DoRALinear

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)


def tiny(seed=0, biases=False):
    torch.manual_seed(seed)
    model = GPT(CFG).eval()
    if biases:  # GPT-2's init zeroes them; nonzero biases check that DoRA does not rescale them
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith(".bias") and p.dim() == 1 and "ln_" not in n:
                    p.normal_(0, 0.1)
    return model


def with_dora(config, seed=0, biases=False):
    base = tiny(seed, biases)
    return base, attach(copy.deepcopy(base), config)


def tokens(B=3, T=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, adapter="default", seed=1, std=0.1):
    """Nonzero A and B and m ≠ ‖W0‖, as after training (at init the adapter does nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if re.search(rf"\.lora_[AB]\.{adapter}\.weight$", n):
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif re.search(rf"\.lora_magnitude_vector\.{adapter}(\.weight)?$", n):
                p.mul_(1 + torch.randn(p.shape, generator=g) * std)
    return model


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def dora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, DoRALinear)}


def paper(x, W0, b, m, A, B, s, detach=True):
    """The oracle: eq. (5) as written, with the (d_out, d_in) matrix V = W0 + s·BA formed."""
    V = W0 + s * B @ A
    norm = torch.linalg.norm(V, dim=1)  # per output row
    norm = norm.detach() if detach else norm
    return F.linear(x, (m / norm)[:, None] * V, b)


def factors(m, name="default"):
    B, A = m.factors(name)
    return m.base_layer.weight, m.base_layer.bias, m.lora_magnitude_vector[name], A, B, m.scaling[name]


CONFIGS = {"c_attn": DoRAConfig(), "all-linear": DoRAConfig(targets="all-linear", r=4),
           "fused_qv": DoRAConfig(fused_qkv=["q", "v"]), "dropout": DoRAConfig(dropout=0.1)}


# ------------------------------------------------------------------------ the module
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_identity_at_init(case):
    base, model = with_dora(CONFIGS[case], biases=True)
    assert torch.equal(logits(model, tokens()), logits(base, tokens()))  # m/‖W0‖ = 1 and B = 0: exactly


def test_magnitude_init_is_row_norm_of_W0():
    _, model = with_dora(DoRAConfig(targets="all-linear"))
    for m in dora_modules(model).values():
        W0 = m.base_layer.weight  # (d_out, d_in)
        torch.testing.assert_close(m.lora_magnitude_vector["default"], torch.linalg.norm(W0, dim=1))
        assert m.lora_magnitude_vector["default"].shape == (W0.shape[0],)


@pytest.mark.parametrize("case", ["c_attn", "fused_qv"])
def test_weight_norm_equals_naive_norm(case):
    _, model = with_dora(CONFIGS[case])
    randomize(model, std=0.5)
    for m in dora_modules(model).values():
        W0, _, _, A, B, s = factors(m)
        torch.testing.assert_close(m.weight_norm("default"), torch.linalg.norm(W0 + s * B @ A, dim=1))


def test_weight_norm_gradient_equals_naive_norm_gradient():
    """With the norm attached, the row-norm algebra differentiates like the naive norm."""
    _, model = with_dora(DoRAConfig())
    randomize(model, std=0.5)
    m = model.transformer.h[0].attn.c_attn
    W0, _, _, A, B, s = factors(m)
    w = torch.randn(W0.shape[0])
    grads = []
    for norm in (lambda: m.weight_norm("default"), lambda: torch.linalg.norm(W0 + s * B @ A, dim=1)):
        (norm() * w).sum().backward()
        grads.append((A.grad.clone(), B.grad.clone()))
        A.grad = B.grad = None
    for ours, naive in zip(*grads):
        torch.testing.assert_close(ours, naive)


def test_w0_sq_is_cached_and_follows_W0():
    _, model = with_dora(DoRAConfig())
    m = model.transformer.h[0].attn.c_attn
    assert m.w0_sq() is m.w0_sq()  # computed once
    with torch.no_grad():
        m.base_layer.weight.mul_(2)  # a new W0 (as a reload would do): the cache must not go stale
    torch.testing.assert_close(m.w0_sq(), m.base_layer.weight.square().sum(1))


@pytest.mark.parametrize("detach", [True, False])
def test_forward_and_gradients_equal_the_paper_equation(detach):
    _, model = with_dora(DoRAConfig(detach_norm=detach), biases=True)
    randomize(model, std=0.3)
    m = model.transformer.h[1].attn.c_attn
    x = torch.randn(2, 5, 32)
    g = torch.randn(2, 5, 96)
    grads = []
    for fn in (m, lambda x: paper(x, *factors(m), detach=detach)):
        (fn(x) * g).sum().backward()
        grads.append([p.grad.clone() for p in factors(m)[2:5]])  # m, A, B
        model.zero_grad()
    torch.testing.assert_close(m(x), paper(x, *factors(m)), atol=1e-6, rtol=0)
    for ours, oracle in zip(*grads):
        torch.testing.assert_close(ours, oracle, atol=1e-6, rtol=1e-5)


def test_detaching_the_norm_changes_the_gradient_of_A_and_B_only():
    grads = {}
    for detach in (True, False):
        _, model = with_dora(DoRAConfig(detach_norm=detach))
        randomize(model, std=0.3)
        x = tokens()
        model(x, torch.roll(x, -1, 1))[1].backward()
        grads[detach] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n in grads[True]:  # same forward, so ∂L/∂m (which never goes through the norm) is the same
        same = torch.allclose(grads[True][n], grads[False][n], atol=1e-7)
        assert same == ("magnitude" in n), n


def test_bias_is_not_scaled():
    _, model = with_dora(DoRAConfig(), biases=True)
    m = model.transformer.h[0].attn.c_attn
    with torch.no_grad():
        m.lora_magnitude_vector["default"].mul_(2)  # f = 2, B = 0
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(m(x), 2 * (x @ m.base_layer.weight.T) + m.base_layer.bias, atol=1e-6, rtol=0)


def test_dropout_path_equals_the_fast_path_without_dropout():
    """With dropout the DoRA terms see x' (a second W0 matmul): at p = 0 both forms give the same h."""
    _, model = with_dora(DoRAConfig(), biases=True)
    randomize(model, std=0.3)
    m = model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(m.base_layer(x) + m.update(x, "default"), m(x), atol=1e-6, rtol=0)


def test_magnitude_trains_and_changes():
    """m must get a gradient from step 0 and move: a DoRA whose m stays at ‖W0‖ is weight-normalised LoRA."""
    _, model = with_dora(DoRAConfig())
    ms = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    assert len(ms) == 2 and all(model.minilora_config.trainable(n) for n in ms)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(3):
        x = tokens(seed=i)
        model(x, torch.roll(x, -1, 1))[1].backward()
        if i == 0:  # ∂L/∂m_i = Σ g_i z_i/‖·‖_i ≠ 0 at init; ∂L/∂A = 0 there (B = 0), as in LoRA
            c_attn = model.transformer.h[0].attn.c_attn
            assert c_attn.lora_magnitude_vector["default"].grad.abs().sum() > 0
            assert c_attn.lora_A["default"].weight.grad.abs().sum() == 0
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in ms:
            assert (p - ms[n]).abs().max() > 1e-3, f"{n} did not change"


# ------------------------------------------------------------------------ merging
@pytest.mark.parametrize("case", ["c_attn", "all-linear", "fused_qv"])
def test_merge_unmerge_merge_and_unload_exact(case):
    base, model = with_dora(CONFIGS[case], biases=True)
    randomize(model, std=0.3)
    x = tokens()
    before = logits(model, x)
    assert not torch.allclose(before, logits(base, x), atol=1e-3)
    expected = {n: paper(torch.eye(m.base_layer.in_features), *factors(m)).detach() - m.base_layer.bias
                for n, m in dora_modules(model).items()}  # rows of eye(d_in) @ W'ᵀ: W'ᵀ = (m/‖V‖ ⊙ V)ᵀ
    merge(model)
    for n, m in dora_modules(model).items():  # merged weight = m · (W0 + s·BA) / ‖W0 + s·BA‖
        torch.testing.assert_close(m.base_layer.weight, expected[n].T, atol=1e-6, rtol=0)
    merged = {n: p.clone() for n, p in model.state_dict().items()}
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    merge(model)  # idempotent
    assert all(torch.equal(p, merged[n]) for n, p in model.state_dict().items())
    unmerge(model)
    unmerge(model)
    for n, m in dora_modules(model).items():
        torch.testing.assert_close(m.base_layer.weight, base.get_submodule(n).weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    merge_and_unload(model)
    assert not dora_modules(model) and set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)


def test_mixed_batch_rows_equal_single_adapter_runs():
    _, model = with_dora(DoRAConfig(), biases=True)
    randomize(model, std=0.3)
    lora.add_adapter(model, "other", DoRAConfig())
    randomize(model, "other", seed=7, std=0.3)
    x = tokens(B=3)
    runs = {}
    for name in ("default", "other"):
        lora.set_adapter(model, name)
        runs[name] = logits(model, x)
    with lora.disable_adapters(model):
        runs["__base__"] = logits(model, x)
    rows = ["other", "__base__", "default"]
    with lora.adapter_rows(model, rows):
        mixed = logits(model, x)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], runs[name][i], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ what trains, and how much
@pytest.mark.parametrize("config, expected", [
    (DoRAConfig(), 16_384 + 4 * 384),  # LoRA's 4 · 8 · (128 + 384) + m (384) per layer: lessons/06-dora.md
    (DoRAConfig(targets="all-linear"), 65_536 + 4 * (384 + 128 + 512 + 128)),  # + d_out of each linear
])
def test_trainable_count_on_tiny_preset(config, expected):
    torch.manual_seed(0)
    model = attach(GPT(PRESETS["tiny"]), config)
    assert model.num_params(trainable_only=True) == expected
    lora_count = attach(GPT(PRESETS["tiny"]), LoRAConfig(targets=config.targets)).num_params(trainable_only=True)
    d_outs = sum(m.base_layer.out_features for m in dora_modules(model).values())
    assert lora_count + d_outs == expected


def test_embedding_is_refused():
    with pytest.raises(ValueError, match="embedding"):
        DoRAConfig(embedding=True)


# ------------------------------------------------------------------------ files
def test_config_json_round_trip_and_peft_fields(tmp_path):
    _, model = with_dora(DoRAConfig(r=4, alpha=8, detach_norm=False))
    randomize(model)
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["minilora_method"] == "dora" and raw["peft_type"] == "LORA" and raw["use_dora"] is True
    assert raw["fan_in_fan_out"] is True and DoRAConfig.from_json(raw) == model.minilora_config
    keys = set(load_safetensors(tmp_path / ADAPTER_WEIGHTS))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector" in keys  # PEFT's key
    fresh = load_adapter(tiny(), tmp_path)
    assert fresh.minilora_config.detach_norm is False
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))
    peft_style = {k: v for k, v in raw.items() if not k.startswith("minilora")}
    assert DoRAConfig.from_json(peft_style) == DoRAConfig(r=4, alpha=8, targets=["c_attn"])
    with pytest.raises(CheckpointError, match="use_dora"):
        LoRAConfig.from_json(peft_style)  # LoRA refuses a DoRA file rather than dropping m


# ------------------------------------------------------------------------ parity with Hugging Face PEFT
PARITY = {  # case: (minilora config, the same adapter as PEFT's LoraConfig kwargs)
    "c_attn": (DoRAConfig(r=4, alpha=8), dict(r=4, lora_alpha=8, target_modules=["c_attn"])),
    "all-linear": (DoRAConfig(r=4, alpha=8, targets="all-linear"),
                   dict(r=4, lora_alpha=8, target_modules="all-linear")),
    "rslora+layers": (DoRAConfig(r=4, alpha=8, use_rslora=True, layers=[1]),
                      dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["c_attn"], layers_to_transform=[1],
                           layers_pattern="h")),
}


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="transformers not installed: no PEFT parity")
    peft = pytest.importorskip("peft", reason="peft not installed: no PEFT parity")
    transformers.utils.logging.disable_progress_bar()
    directory = tmp_path_factory.mktemp("hf_base")
    tiny(seed=3, biases=True).save_pretrained(directory, hf=True)
    return directory, transformers, peft


def peft_logits(model, idx):
    model.eval()
    with torch.no_grad():
        return model(idx).logits


def load_in_peft(peft, transformers, directory, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about minilora's extra config keys, then ignores them
        return peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(directory), adapter_dir,
                                              is_trainable=True)


@pytest.mark.parametrize("case", [*PARITY, "fused_qv"])
def test_minilora_adapter_loads_in_peft(case, hf_base, tmp_path):
    directory, transformers, peft = hf_base
    config = DoRAConfig(r=4, alpha=8, fused_qkv=["q", "v"]) if case == "fused_qv" else PARITY[case][0]
    model = randomize(attach(GPT.from_pretrained(directory), config), std=0.3)
    save_adapter(model, tmp_path)
    theirs = load_in_peft(peft, transformers, directory, tmp_path)
    ours = logits(model, tokens())
    assert not torch.allclose(ours, logits(GPT.from_pretrained(directory), tokens()), atol=1e-3)
    torch.testing.assert_close(peft_logits(theirs, tokens()), ours, atol=1e-5, rtol=0)


def test_gradients_equal_peft(hf_base, tmp_path):
    """One backward through both: ∂L/∂m, ∂L/∂A, ∂L/∂B agree (PEFT also detaches the norm)."""
    directory, transformers, peft = hf_base
    model = randomize(attach(GPT.from_pretrained(directory), DoRAConfig(r=4, alpha=8)), std=0.3)
    save_adapter(model, tmp_path)
    theirs = load_in_peft(peft, transformers, directory, tmp_path).eval()
    x, w = tokens(), torch.randn(3, 10, CFG.vocab_size, generator=torch.Generator().manual_seed(5))
    (model(x)[0] * w).sum().backward()
    (theirs(x).logits * w).sum().backward()
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    peft_grads = {n.removeprefix("base_model.model.").removesuffix(".weight"): p.grad
                  for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n.removesuffix(".weight") for n in ours} == set(peft_grads)
    for n, g in ours.items():
        torch.testing.assert_close(g, peft_grads[n.removesuffix(".weight")], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", PARITY)
def test_peft_adapter_loads_in_minilora(case, hf_base, tmp_path):
    """PEFT saves DoRA as peft_type LORA + use_dora; load_adapter routes it to DoRA (peft_match)."""
    directory, transformers, peft = hf_base
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(hf, peft.LoraConfig(use_dora=True, fan_in_fan_out=True, lora_dropout=0.0,
                                                         **PARITY[case][1]))
        randomize(theirs, std=0.3)
        theirs.save_pretrained(tmp_path)
    assert "minilora_method" not in json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    ours = load_adapter(GPT.from_pretrained(directory), tmp_path)
    assert isinstance(ours.minilora_config, DoRAConfig)
    torch.testing.assert_close(logits(ours, tokens()), peft_logits(theirs, tokens()), atol=1e-5, rtol=0)
    assert ours.num_params(trainable_only=True) == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert minilora.METHODS["dora"].lr > 0


def test_magnitude_direction_change_by_hand():
    from minilora.dora import magnitude_direction_change
    w0 = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    w = torch.tensor([[6.0, 8.0], [0.0, 2.0]])  # row 0: same direction, norm 5 -> 10; row 1: turned 90°, 1 -> 2
    dM, dD = magnitude_direction_change(w0, w)
    assert dM == pytest.approx((5 + 1) / 2) and dD == pytest.approx((0 + 1) / 2)


def test_decomposition_tracker_records_every_layer_at_each_eval():
    from minilora.data import Example, Task
    from minilora.dora import DecompositionTracker
    from minilora.train import TrainConfig, train
    torch.manual_seed(0)
    model = minilora.attach(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)),
                            DoRAConfig())
    ex = [Example([1, 2, 3], [4, 63]) for _ in range(8)]
    tracker = DecompositionTracker(model)
    train(model, Task("t", "", "", ex, ex, ex), TrainConfig(steps=4, batch_size=4, eval_every=2, lr=1e-2,
                                                           progress=False), callbacks=[tracker])
    assert [(s, layer) for s, layer, _, _ in tracker.points] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert all(dm > 0 and dd > 0 for _, _, dm, dd in tracker.points)  # the weights really moved


# ------------------------------------------------------------------------ QDoRA: DoRA on the NF4 base
from minilora import QDoRAConfig  # noqa: E402
from minilora.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402
from minilora.qlora import Linear4bit  # noqa: E402


def quantized(base):
    """The base with every linear but lm_head replaced by doubleDequant(NF4(W0)): what QDoRA starts from."""
    q = copy.deepcopy(base)
    with torch.no_grad():
        for n, m in q.named_modules():
            if isinstance(m, torch.nn.Linear) and n != "lm_head":
                m.weight.copy_(dequantize_nf4(quantize_nf4(m.weight)))
    return q


def test_qdora_at_init_equals_the_nf4_quantized_base():
    base, model = with_dora(QDoRAConfig(), biases=True)
    assert all(isinstance(m.base_layer, Linear4bit) for m in dora_modules(model).values())
    x = tokens()
    assert torch.equal(logits(model, x), logits(quantized(base), x))  # exactly: f = 1 and B = 0
    assert not torch.allclose(logits(model, x), logits(base, x), atol=1e-4)  # not the original base
    assert QDoRAConfig.identity_at_init is False


def test_qdora_magnitude_init_is_row_norm_of_the_dequantized_W0():
    base, model = with_dora(QDoRAConfig())
    for n, m in dora_modules(model).items():
        W0q = m.base_layer.quant.dequantize(torch.float32)  # (d_out, d_in)
        mag = m.lora_magnitude_vector["default"]
        torch.testing.assert_close(mag, torch.linalg.norm(W0q, dim=1), atol=1e-6, rtol=0)
        assert (mag - torch.linalg.norm(base.get_submodule(n).weight, dim=1)).abs().max() > 1e-4  # not ‖W0‖


def test_qdora_a_few_steps_lower_the_loss_and_leave_the_nf4_buffers_alone():
    _, model = with_dora(QDoRAConfig(r=4, alpha=8))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    mags = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    assert mags and all(model.minilora_config.trainable(n) for n in mags)
    x, y = tokens(8, 12), tokens(8, 12, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())  # NF4 bytes and constants
    assert all((p - mags[n]).abs().max() > 1e-3 for n, p in model.named_parameters() if n in mags)


def test_qdora_detached_norm_saves_no_dense_weight_for_backward():
    for detach in (True, False):
        _, model = with_dora(QDoRAConfig(detach_norm=detach))
        shapes = {(m.base_layer.out_features, m.base_layer.in_features) for m in dora_modules(model).values()}
        shapes |= {s[::-1] for s in shapes}  # a weight, or its transpose
        x = tokens()  # (3, 10): no activation here has a weight's shape
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            model(x, torch.roll(x, -1, 1))
        dense = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in shapes]
        assert bool(dense) == (not detach)  # attached: W0q Aᵀ in weight_norm keeps the dequantized W0q


def test_qdora_save_load_identical_logits_with_peft_dora_fields(tmp_path):
    _, model = with_dora(QDoRAConfig(r=4, alpha=8))
    randomize(model)
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["minilora_method"] == "qdora" and raw["peft_type"] == "LORA" and raw["use_dora"] is True
    assert raw["fan_in_fan_out"] is False and raw["minilora_quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert QDoRAConfig.from_json(raw) == model.minilora_config
    keys = set(load_safetensors(tmp_path / ADAPTER_WEIGHTS))
    assert "base_model.model.transformer.h.0.mlp.c_fc.lora_magnitude_vector" in keys
    assert all(re.search(r"\.(lora_[AB]\.weight|lora_magnitude_vector)$", k) for k in keys)  # no NF4 buffers
    fresh = load_adapter(tiny(), tmp_path)  # an unquantized base: load_adapter quantizes it again
    assert isinstance(fresh.minilora_config, QDoRAConfig)
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))


def test_qdora_merge_is_exact_in_W0s_dtype_and_unmerge_restores_the_4bit_layer():
    base, model = with_dora(QDoRAConfig(), biases=True)
    randomize(model, std=0.3)
    x = tokens()
    before, buffers = logits(model, x), {k: v.clone() for k, v in model.named_buffers()}
    expected = {}
    for n, m in dora_modules(model).items():  # paper(): m · (W0q + s·BA)/‖W0q + s·BA‖, W0q dequantized
        W0q, b, mag, A, B, s = factors(m)
        expected[n] = paper(torch.eye(m.base_layer.in_features), W0q, None, mag, A, B, s).detach().T
    merge(model)
    for n, m in dora_modules(model).items():
        assert type(m.base_layer) is torch.nn.Linear and m.base_layer.weight.dtype == torch.float32
        torch.testing.assert_close(m.base_layer.weight, expected[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    merge(model)  # idempotent
    unmerge(model)
    assert all(isinstance(m.base_layer, Linear4bit) for m in dora_modules(model).values())
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert torch.equal(logits(model, x), before)  # bit for bit: the 4-bit layer itself came back
    merge_and_unload(model)
    assert not dora_modules(model) and set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)


def test_qdora_trainable_count_on_tiny_preset():
    torch.manual_seed(0)
    model = attach(GPT(PRESETS["tiny"]), QDoRAConfig())  # all-linear, r 8: DoRA's count (lessons/06-dora.md §11)
    assert model.num_params(trainable_only=True) == 70_144
