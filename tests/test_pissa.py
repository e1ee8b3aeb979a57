"""PiSSA / OLoRA / Gaussian init (minilora/pissa.py): the properties its docstring claims, checked against the SVD
and QR written out here (the oracle), the conversion to a plain LoRA, clear errors, and parity with Hugging Face
PEFT's init_lora_weights="pissa" / "olora" / "gaussian" (skipped when peft/transformers are missing)."""
import copy
import json
import os
import re
import warnings

import pytest
import torch

from minilora import GPT, GPTConfig, LoRAConfig, attach, load_adapter, merge, merge_and_unload, save_adapter, unmerge
from minilora.attach import ADAPTER_CONFIG
from minilora.pissa import OLoRAConfig, PiSSAConfig, initial_factors, quantization_error, to_lora

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)


def tiny(seed=0, biases=True):
    torch.manual_seed(seed)
    model = GPT(CFG).eval()
    with torch.no_grad():  # GPT-2's init zeroes the biases; nonzero ones check they are left alone
        for n, p in model.named_parameters():
            if biases and n.endswith(".bias") and "ln_" not in n:
                p.normal_(0, 0.1)
    return model


def with_init(config, seed=0):
    base = tiny(seed)
    return base, attach(copy.deepcopy(base), config)


def tokens(B=3, T=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, idx=None):
    with torch.no_grad():
        return model(tokens() if idx is None else idx)[0]


def layers(model, name="default"):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and name in m.scaling}


def randomize(model, seed=1, std=0.05):
    """Move A and B away from their init, as training does (LoRA keys only: the residual base stays)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if re.search(r"\.lora_[AB]\.default\.weight$", n):
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


CONFIGS = {
    "pissa": PiSSAConfig(),
    "olora": OLoRAConfig(),
    "pissa_niter_4": PiSSAConfig(init="pissa_niter_4"),
    "gaussian": PiSSAConfig(init="gaussian"),
    "all-linear r4": PiSSAConfig(targets="all-linear", r=4, alpha=4),
    "rslora+rank_pattern": PiSSAConfig(targets="all-linear", use_rslora=True, rank_pattern={"c_fc": 2},
                                       alpha_pattern={r"h\.1\.attn\.c_proj": 3}),
    "olora all-linear bias=all": OLoRAConfig(targets="all-linear", r=4, bias="all"),
}


# ------------------------------------------------------------------------ the init
@pytest.mark.parametrize("case", CONFIGS)
def test_identity_at_init(case):
    """W_res + s·B0A0 = W0 up to float32 rounding: logits to 1e-6 (Gaussian, B0 = 0 and W0 untouched: exactly)."""
    base, model = with_init(CONFIGS[case])
    if CONFIGS[case].init == "gaussian":
        assert torch.equal(logits(model), logits(base))
    else:
        assert not torch.equal(model.transformer.h[0].attn.c_attn.base_layer.weight,
                               base.transformer.h[0].attn.c_attn.weight)  # W0 really was replaced
        torch.testing.assert_close(logits(model), logits(base), atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", CONFIGS)
def test_residual_plus_scaled_B0A0_is_W0(case):
    """In float64: |W_res + s·B0A0 − W0| ≤ half an ulp of |W_res| (the one rounding of W_res), every entry."""
    base, model = with_init(CONFIGS[case])
    for n, m in layers(model).items():
        B, A = m.params("default")
        W_res, W0 = m.base_layer.weight.double(), base.get_submodule(n).weight.double()
        err = (W_res + m.scaling["default"] * (B.double() @ A.double()) - W0).abs()
        assert (err <= 2.0 ** -24 * W_res.abs() + 1e-15).all(), n


def test_residual_is_exact_in_float64():
    base = tiny().double()
    model = attach(copy.deepcopy(base), PiSSAConfig(targets="all-linear"))
    for n, m in layers(model).items():
        B, A = m.params("default")
        torch.testing.assert_close(m.base_layer.weight + m.scaling["default"] * B @ A, base.get_submodule(n).weight,
                                   atol=1e-15, rtol=0)


def test_A_B_are_the_principal_singular_vectors():
    """B0 = U_r (S_r/s)^½, A0 = (S_r/s)^½ V_rᵀ (up to the sign of each pair), s·B0A0 = U_r S_r V_rᵀ, and W_res
    keeps the rest of the spectrum: its singular values are S[r:]."""
    cfg = PiSSAConfig(r=4, alpha=8, targets="all-linear")
    base, model = with_init(cfg)
    for n, m in layers(model).items():
        B, A = (t.double() for t in m.params("default"))
        s = m.scaling["default"]
        U, S, Vh = torch.linalg.svd(base.get_submodule(n).weight.double(), full_matrices=False)
        root = (S[:4] / s).sqrt()
        sign = torch.sign((B * U[:, :4]).sum(0))  # (r,): the sign LAPACK gave each pair
        torch.testing.assert_close(B, U[:, :4] * root * sign, atol=1e-6, rtol=0)
        torch.testing.assert_close(A, (root * sign)[:, None] * Vh[:4], atol=1e-6, rtol=0)
        torch.testing.assert_close(s * B @ A, U[:, :4] * S[:4] @ Vh[:4], atol=1e-6, rtol=0)
        S_res = torch.linalg.svdvals(m.base_layer.weight.double())
        torch.testing.assert_close(S_res[: len(S) - 4], S[4:], atol=1e-6, rtol=0)
        assert S_res[len(S) - 4:].max() < 1e-5  # W_res has rank min(d_out, d_in) − r


def test_olora_B_is_orthonormal_and_A_upper_triangular():
    """OLoRA (PEFT's olora_init): B0 = Q[:, :r] (orthonormal columns), A0 = R[:r], so B0A0 = Q_rQ_rᵀW0: W0
    projected on the span of its first r columns, which it reproduces exactly."""
    base, model = with_init(OLoRAConfig(r=4, targets="all-linear"))
    for n, m in layers(model).items():
        B, A = (t.double() for t in m.params("default"))
        W0 = base.get_submodule(n).weight.double()
        torch.testing.assert_close(B.T @ B, torch.eye(4, dtype=torch.double), atol=1e-6, rtol=0)
        assert torch.equal(A[:, :4], A[:, :4].triu())
        torch.testing.assert_close(B @ A, B @ B.T @ W0, atol=1e-6, rtol=0)
        torch.testing.assert_close((B @ A)[:, :4], W0[:, :4], atol=1e-6, rtol=0)


def test_pissa_niter_is_close_to_the_svd_and_reproducible():
    """The randomized SVD (torch.svd_lowrank, seeded) nears the exact top-r part as the iterations grow: on a
    weight with singular values 0.7^i, ‖W − s·BA‖ is within 1 % of the best rank-r error (Eckart-Young) after 4.
    The seed makes every attach (and so load_adapter) draw the same W_res, bit for bit."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(96, 32, generator=g, dtype=torch.double))
    V, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.double))
    W = U * 0.7 ** torch.arange(32.0, dtype=torch.double) @ V.T  # singular values 0.7^i
    exact_B, exact_A = initial_factors(W, 4, 2.0, "pissa")
    best = (W - 2.0 * exact_B @ exact_A).norm()
    ratio = {k: ((W - 2.0 * torch.matmul(*initial_factors(W, 4, 2.0, f"pissa_niter_{k}"))).norm() / best).item()
             for k in (0, 1, 4)}
    assert ratio[0] > ratio[1] > ratio[4] and ratio[4] < 1.01
    B, A = initial_factors(W, 4, 2.0, "pissa_niter_4")
    torch.manual_seed(0)  # the same algorithm and draws as torch.svd_lowrank with the global seed 0
    Ul, Sl, Vl = torch.svd_lowrank(W, q=4, niter=4)
    torch.testing.assert_close(2.0 * B @ A, Ul * Sl @ Vl.T, atol=1e-12, rtol=0)
    _, one = with_init(PiSSAConfig(init="pissa_niter_2"))
    _, two = with_init(PiSSAConfig(init="pissa_niter_2"))
    assert all(torch.equal(p, q) for p, q in zip(one.state_dict().values(), two.state_dict().values()))


def test_gaussian_init_A_normal_std_1_over_r_and_B_zero():
    _, model = with_init(PiSSAConfig(init="gaussian", targets="all-linear", r=8))
    A = torch.cat([m.params("default")[1].flatten() for m in layers(model).values()])
    assert all(not m.params("default")[0].any() for m in layers(model).values())
    assert abs(A.mean()) < 0.01 and abs(A.std() - 1 / 8) < 0.05 / 8  # PEFT: normal_(std=1/r)


def test_every_factor_gets_a_gradient_at_step_0():
    """Unlike LoRA (B = 0, so ∂L/∂A = 0 at step 0), PiSSA's and OLoRA's A and B both move at once."""
    for cfg in (PiSSAConfig(), OLoRAConfig()):
        _, model = with_init(cfg)
        idx = tokens()
        model.train()
        model(idx, torch.roll(idx, -1, 1))[1].backward()
        assert all(p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_merge_unmerge_merge_and_unload():
    base, model = with_init(PiSSAConfig(targets="all-linear"))
    randomize(model)
    before = logits(model)
    merge(model)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    unmerge(model)
    torch.testing.assert_close(logits(model), before, atol=1e-5, rtol=0)
    plain = merge_and_unload(model)
    torch.testing.assert_close(logits(plain), before, atol=1e-5, rtol=0)
    assert plain.minilora_config is None and type(plain.transformer.h[0].attn.c_attn) is torch.nn.Linear


# ------------------------------------------------------------------------ files
@pytest.mark.parametrize("case", CONFIGS)
def test_load_adapter_onto_the_original_base_recomputes_the_residual(case, tmp_path):
    """The file holds A, B only; load_adapter on a fresh ORIGINAL base re-attaches (SVD / QR again) and gives
    identical logits, bit for bit."""
    _, model = with_init(CONFIGS[case])
    randomize(model)
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["init_lora_weights"] == CONFIGS[case].init and raw["peft_type"] == "LORA"
    fresh = load_adapter(tiny(), tmp_path)
    assert type(fresh.minilora_config) is type(CONFIGS[case]) and fresh.minilora_config == CONFIGS[case]
    assert torch.equal(logits(fresh), logits(model))


@pytest.mark.parametrize("case", CONFIGS)
def test_conversion_to_lora_is_exact(case, tmp_path):
    """to_lora: ΔW = s·BA − s·B0A0 as a plain rank-2r LoRA; loaded with load_adapter onto the ORIGINAL base it
    gives the trained model's logits (to float32 rounding)."""
    base, model = with_init(CONFIGS[case])
    randomize(model)
    if CONFIGS[case].bias == "all":
        with torch.no_grad():
            model.transformer.h[1].mlp.c_fc.base_layer.bias.add_(0.5)  # a trained bias travels too
    save_adapter(to_lora(model, base), tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["minilora_method"] == "lora" and raw["r"] == 2 * CONFIGS[case].r
    assert raw["init_lora_weights"] is True
    converted = load_adapter(copy.deepcopy(base), tmp_path)
    for n, m in layers(converted).items():
        assert m.scaling["default"] == pytest.approx(layers(model)[n].scaling["default"])
    assert not torch.allclose(logits(model), logits(base), atol=1e-3)
    torch.testing.assert_close(logits(converted), logits(model), atol=1e-5, rtol=0)


def test_conversion_refuses_a_wrong_original_or_a_merged_adapter():
    base, model = with_init(PiSSAConfig())
    randomize(model)
    with pytest.raises(ValueError, match="not the original's weight"):
        to_lora(model, tiny(seed=5))
    with pytest.raises(ValueError, match="nothing attached"):
        to_lora(model, model)
    merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        to_lora(model, base)


def test_config_json_round_trip_and_peft_fields():
    for cfg in CONFIGS.values():
        raw = json.loads(json.dumps(cfg.to_json()))
        assert type(cfg).from_json(raw) == cfg and raw["init_lora_weights"] == cfg.init
    peft_style = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"],
                  "init_lora_weights": "pissa_niter_16"}
    assert PiSSAConfig.from_json(peft_style) == PiSSAConfig(r=4, alpha=8, init="pissa_niter_16")
    assert PiSSAConfig.peft_match(peft_style) and not OLoRAConfig.peft_match(peft_style)
    assert OLoRAConfig.peft_match({**peft_style, "init_lora_weights": "olora"})


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("config, match", [
    (PiSSAConfig(targets="all-linear", r=33), r"h\.0\.attn\.c_attn: r=33 is larger than min\(d_out, d_in\) = 32"),
    (OLoRAConfig(r=40), r"r=40 is larger than min\(d_out, d_in\) = 32"),
    (PiSSAConfig(targets="all-linear", r=4, rank_pattern={"mlp.c_proj": 40}), r"h\.0\.mlp\.c_proj: r=40"),
    (PiSSAConfig(targets=["lm_head"]), "tied"),
])
def test_clear_errors_on_attach(config, match):
    """Refused before any weight is written: the W0 of modules checked earlier (c_attn) are untouched."""
    model = tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        attach(model, config)
    after = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if ".lora_" not in n}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_clear_errors_in_the_config():
    with pytest.raises(ValueError, match="pissa_niter_<K>"):
        PiSSAConfig(init="pisa")
    with pytest.raises(ValueError, match="embedding"):
        PiSSAConfig(embedding=True)
    with pytest.raises(ValueError, match="fused_qkv"):
        OLoRAConfig(fused_qkv=["q", "v"])


def test_gaussian_and_kaiming_allow_any_rank():
    attach(tiny(), PiSSAConfig(init="gaussian", r=40))  # no SVD: r > min(d_out, d_in) is LoRA's business


# ------------------------------------------------------------------------ QPiSSA
def test_quantization_error_of_the_residual_is_smaller_on_a_low_rank_plus_noise_weight():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 8, generator=g) @ torch.randn(8, 128, generator=g) + 0.1 * torch.randn(256, 128, generator=g)
    err = quantization_error(W, r=8)
    assert err["qpissa"] < 0.5 * err["qlora"] and err["reduction"] == pytest.approx(1 - err["qpissa"] / err["qlora"])
    assert quantization_error(W, r=0)["reduction"] == pytest.approx(0, abs=1e-12)  # r = 0: W_res = W0


# ------------------------------------------------------------------------ parity with Hugging Face PEFT
@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="transformers not installed: no PEFT parity")
    peft = pytest.importorskip("peft", reason="peft not installed: no PEFT parity")
    transformers.utils.logging.disable_progress_bar()
    directory = tmp_path_factory.mktemp("hf_base")
    tiny(seed=3).save_pretrained(directory, hf=True)
    return directory, transformers, peft


def peft_model(peft, model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.LoraConfig(lora_dropout=0.0, **kwargs)).eval()


def peft_logits(model, idx=None):
    with torch.no_grad():
        out = model(tokens() if idx is None else idx)
        return out.logits if hasattr(out, "logits") else out[0]


def assert_same_up_to_sign(ours, theirs, atol):
    """ours, theirs: {module: (B, A, W_res)}; each pair (B[:, i], A[i]) may differ by one sign flip."""
    assert ours.keys() == theirs.keys()
    for n, (B, A, W) in ours.items():
        tB, tA, tW = theirs[n]
        sign = torch.sign((B * tB).sum(0))  # (r,)
        torch.testing.assert_close(B * sign, tB, atol=atol, rtol=0)
        torch.testing.assert_close(A * sign[:, None], tA, atol=atol, rtol=0)
        torch.testing.assert_close(W, tW, atol=1e-6, rtol=0)


def ours_factors(model):
    return {n: (*m.params("default"), m.base_layer.weight) for n, m in layers(model).items()}


def peft_factors(model, transpose):
    """PEFT's lora_A (r, d_in), lora_B (d_out, r) and base weight; a Conv1D base (in, out) is transposed."""
    out = {}
    for n, m in model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            W = m.base_layer.weight
            out[n.removeprefix("base_model.model.")] = (m.lora_B["default"].weight, m.lora_A["default"].weight,
                                                        W.T if transpose else W)
    return out


@pytest.mark.parametrize("init", ["pissa", "gaussian"])
@pytest.mark.parametrize("targets", [["c_attn"], "all-linear"])
def test_peft_same_factors_residual_and_logits_on_hf_gpt2(init, targets, hf_base):
    """PEFT's init on Hugging Face's GPT-2 (Conv1D, fan_in_fan_out=True) and ours on the same weights: the same
    A, B (PiSSA: up to the sign of each singular pair) and W_res, and the same logits. Gaussian draws A at
    random: the same B = 0, W_res = W0, and A with std 1/r in both."""
    directory, transformers, peft = hf_base
    theirs = peft_model(peft, transformers.GPT2LMHeadModel.from_pretrained(directory), r=4, lora_alpha=8,
                        target_modules=targets, fan_in_fan_out=True, init_lora_weights=init)
    ours = attach(GPT.from_pretrained(directory), PiSSAConfig(r=4, alpha=8, targets=targets, init=init))
    mine, their = ours_factors(ours), peft_factors(theirs, transpose=True)
    if init == "pissa":
        assert_same_up_to_sign(mine, their, atol=1e-5)  # PEFT runs its SVD in float32, we in float64
    else:
        assert mine.keys() == their.keys()
        for n, (B, A, W) in mine.items():
            assert not B.any() and not their[n][0].any() and torch.equal(W, their[n][2])
        a, b = (torch.cat([f[1].flatten() for f in x.values()]) for x in (mine, their))
        assert abs(a.std() - 0.25) < 0.05 and abs(b.std() - 0.25) < 0.05
    torch.testing.assert_close(logits(ours), peft_logits(theirs), atol=1e-5, rtol=0)


def test_peft_olora_same_factors_residual_and_logits(hf_base):
    """OLoRA against PEFT on minilora's own GPT (nn.Linear layers, which PEFT adapts as any torch model): PEFT
    0.21's olora_init takes the QR of the stored weight without fan_in_fan_out, so on GPT-2's Conv1D it
    factors Wᵀ (c_attn: a shape error; square c_proj: not the base at step 0)."""
    directory, _, peft = hf_base
    theirs = peft_model(peft, GPT.from_pretrained(directory).eval(), r=4, lora_alpha=8, init_lora_weights="olora",
                        target_modules=["c_attn", "c_proj", "c_fc"])  # PEFT's "all-linear" takes lm_head here
    ours = attach(GPT.from_pretrained(directory), OLoRAConfig(r=4, alpha=8, targets="all-linear"))
    assert_same_up_to_sign(ours_factors(ours), peft_factors(theirs, transpose=False), atol=1e-5)
    torch.testing.assert_close(logits(ours), peft_logits(theirs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [PiSSAConfig(r=4, alpha=8, targets="all-linear"), PiSSAConfig(init="gaussian")])
def test_minilora_adapter_loads_in_peft(config, hf_base, tmp_path):
    """Our file in PeftModel.from_pretrained on the ORIGINAL GPT-2: PEFT recomputes W_res (init_lora_weights in
    the file) and loads A, B: our logits."""
    directory, transformers, peft = hf_base
    model = randomize(attach(GPT.from_pretrained(directory), config))
    save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about minilora's extra config keys, then ignores them
        theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(directory), tmp_path)
    torch.testing.assert_close(peft_logits(theirs.eval()), logits(model), atol=1e-5, rtol=0)


def test_converted_adapter_loads_in_peft(hf_base, tmp_path):
    directory, transformers, peft = hf_base
    original = GPT.from_pretrained(directory)
    model = randomize(attach(copy.deepcopy(original), PiSSAConfig(r=4, alpha=8, targets="all-linear")))
    save_adapter(to_lora(model, original), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(directory), tmp_path)
    torch.testing.assert_close(peft_logits(theirs.eval()), logits(model), atol=1e-5, rtol=0)


def test_peft_pissa_adapter_loads_in_minilora(hf_base, tmp_path):
    """PEFT's saved PiSSA file (peft_type LORA, init_lora_weights "pissa") onto a fresh original base."""
    directory, transformers, peft = hf_base
    theirs = peft_model(peft, transformers.GPT2LMHeadModel.from_pretrained(directory), r=4, lora_alpha=8,
                        target_modules=["c_attn"], fan_in_fan_out=True, init_lora_weights="pissa")
    randomize(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    ours = load_adapter(attach(GPT.from_pretrained(directory), PiSSAConfig.from_json(raw)), tmp_path)
    torch.testing.assert_close(logits(ours), peft_logits(theirs), atol=1e-5, rtol=0)
    assert not LoRAConfig.peft_match(raw)  # lora.py leaves PEFT's PiSSA files to pissa.py
    ours = load_adapter(GPT.from_pretrained(directory), tmp_path)  # routed by init_lora_weights alone
    assert type(ours.minilora_config) is PiSSAConfig
    torch.testing.assert_close(logits(ours), peft_logits(theirs), atol=1e-5, rtol=0)
