"""LoftQ (minilora/loftq.py): the codes, Alg. 1 against its definition and against PEFT (4-bit: PEFT's loftq_init;
2-bit: PEFT ≤ 0.19's NFQuantizer path, transcribed), the error curve on the embedded base's weights, what attaching
builds, files, and PEFT + bitsandbytes running our adapter on the Q_T base."""
import copy
import json
import os
import types
import warnings
from statistics import NormalDist

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minilora import BASE_DIR, GPT, GPTConfig, attach, load_adapter, save_adapter
from minilora.attach import ADAPTER_CONFIG
# importing minilora.loftq registers "loftq" (minilora/__init__.py does not import it yet)
from minilora.loftq import (LOFTQ_CODES, LoftQConfig, LoftQLinear4bit, dequantized_base, error_curves, loftq_init,
                            normal_float_code, quantize)
from minilora.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4, unpack_nibbles
from minilora.nf4 import normal_float_code as nf4_normal_float_code
from minilora.qlora import QLoRAConfig, QLoRALinear

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=128, block_size=32)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def with_loftq(config=None, seed=0):
    base = tiny(seed)
    return base, attach(copy.deepcopy(base), config or LoftQConfig(r=4, alpha=8))


def tokens(B=4, T=24, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def train_steps(model, n=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for i in range(n):
        model(tokens(seed=i), tokens(seed=i + 10))[1].backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def base_weights():
    """The embedded base's 16 linear weights (c_attn, attn.c_proj, c_fc, mlp.c_proj of 4 blocks)."""
    base = GPT.from_pretrained(BASE_DIR)
    return base, {n: m.weight.detach() for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


# ------------------------------------------------------------------------ codes and q_N
def test_normal_float_code_at_4_bits_is_nf4_bit_for_bit():
    assert torch.equal(normal_float_code(4), NF4_CODE) and torch.equal(normal_float_code(4), nf4_normal_float_code())
    assert torch.equal(LOFTQ_CODES["nf4"], NF4_CODE)


def test_nf2_code_is_loftqs_create_normal_map():
    # LoftQ's create_normal_map(num_bits=2) (yxli2123/LoftQ utils.py; PEFT ≤ 0.19 NFQuantizer), transcribed with
    # statistics.NormalDist in place of scipy's norm.ppf: the NF4 offset δ is kept at 2 bits
    offset, variations, ppf = 0.9677083, 4, NormalDist().inv_cdf
    v = ([ppf(p) for p in torch.linspace(offset, 0.5, variations // 2 + 1)[:-1].tolist()] + [0]
         + [-ppf(p) for p in torch.linspace(offset, 0.5, variations // 2)[:-1].tolist()])
    table = torch.Tensor(v).sort().values
    assert torch.equal(LOFTQ_CODES["nf2"], table / table.max())
    torch.testing.assert_close(LOFTQ_CODES["nf2"], torch.tensor([-1.0, 0.0, 0.3379, 1.0]), rtol=0, atol=1e-4)
    # LoftQ's create_uniform_map(num_bits=2) is torch.linspace(-1, 1, 4)
    assert torch.equal(LOFTQ_CODES["int2"], torch.linspace(-1, 1, 4))
    torch.testing.assert_close(LOFTQ_CODES["int2"], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_nf4_equals_nf4_module_bit_for_bit(double_quant):
    w = torch.randn(33, 47) * 0.02  # 1551 weights: a partial last block and an odd count
    ours, ref = quantize(w, "nf4", double_quant=double_quant), quantize_nf4(w, double_quant=double_quant)
    for k in ("packed", "absmax", "absmax_scale", "absmax_offset"):
        a, b = getattr(ours, k), getattr(ref, k)
        assert (a is None and b is None) or torch.equal(a, b), k
    assert torch.equal(ours.dequantize(), dequantize_nf4(ref))


@pytest.mark.parametrize("quant_type", ["nf2", "int2"])
def test_2bit_codes_use_four_levels_per_block(quant_type):
    w = torch.randn(64, 32) * 0.02
    q = quantize(w, quant_type)
    index = unpack_nibbles(q.packed, w.numel())
    assert index.max() <= 3  # 2 bits of information, stored one per nibble
    scale = q.absmax.repeat_interleave(64)
    torch.testing.assert_close(q.dequantize().reshape(-1), LOFTQ_CODES[quant_type][index] * scale, rtol=0, atol=0)


# ------------------------------------------------------------------------ Alg. 1
def test_t1_equals_nf4_quantization_plus_rank_r_svd_of_the_residual():
    W = torch.randn(96, 64) * 0.02
    q, B, A, errors = loftq_init(W, 8, "nf4", num_iter=1)
    Q = dequantize_nf4(quantize_nf4(W, double_quant=False))
    assert torch.equal(q.dequantize(), Q)  # Q_1 is QLoRA's quantization of W
    U, S, Vh = torch.linalg.svd(W - Q, full_matrices=False)
    best = U[:, :8] @ torch.diag(S[:8]) @ Vh[:8]  # Eckart-Young: the best rank-8 fit of W − Q
    torch.testing.assert_close(B @ A, best, rtol=0, atol=1e-7)
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-5, atol=0)  # √σ on each side
    assert errors[0] == pytest.approx((W - Q).norm().item()) and errors[1] == pytest.approx((W - Q - B @ A).norm().item())


def peft_loftq_init_on_cpu():
    """PEFT's loftq_init with its hard-coded compute device "cuda" replaced by "cpu" (a constant in its code object);
    nothing else changes: bitsandbytes' NF4 (no double quant), PEFT's SVD and loop."""
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils", reason="peft not installed")
    pytest.importorskip("bitsandbytes", reason="PEFT's LoftQ quantizes with bitsandbytes")
    fn = loftq_utils.loftq_init.__wrapped__  # inside torch.no_grad
    code = fn.__code__.replace(co_consts=tuple("cpu" if c == "cuda" else c for c in fn.__code__.co_consts))
    return torch.no_grad()(types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__))


@pytest.mark.parametrize("num_iter", [1, 3])
def test_equals_peft_loftq_init(num_iter, base_weights):
    peft_init = peft_loftq_init_on_cpu()
    base, weights = base_weights
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.3.mlp.c_proj"):
        W = weights[name]
        Q, lora_A, lora_B = peft_init(W, num_bits=4, reduced_rank=8, num_iter=num_iter)
        q, B, A, _ = loftq_init(W, 8, "nf4", num_iter)
        assert torch.equal(q.dequantize(), Q) and torch.equal(A, lora_A) and torch.equal(B, lora_B), name
    # attached with alpha = r (scaling 1), the model's A, B are PEFT's too
    model = attach(copy.deepcopy(base), LoftQConfig(r=8, alpha=8, targets=["c_attn"], layers=[0], loftq_iter=num_iter))
    m = model.transformer.h[0].attn.c_attn
    Q, lora_A, lora_B = peft_init(weights["transformer.h.0.attn.c_attn"], num_bits=4, reduced_rank=8, num_iter=num_iter)
    assert torch.equal(m.lora_A["default"].weight, lora_A) and torch.equal(m.lora_B["default"].weight, lora_B)
    assert torch.equal(m.base_layer.weight, Q)


def test_2bit_equals_peft_nfquantizer_loftq_init(base_weights):
    """PEFT 0.7–0.18 ran 2-bit LoftQ with its own NFQuantizer(method="normal", block_size=64); 0.19 allows 4 and 8 bits
    only, 0.20 removed NFQuantizer. Its quantize_block + dequantize_block (the packing is lossless, left out) and
    loftq_init's loop, transcribed from peft/utils/loftq_utils.py at v0.18.0, with PEFT's own _low_rank_decomposition."""
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils", reason="peft not installed")
    table = LOFTQ_CODES["nf2"]  # equals create_normal_map(num_bits=2): test_nf2_code_is_loftqs_create_normal_map

    def nf_quantizer_roundtrip(weight, block_size=64):
        block = weight.flatten().reshape(-1, block_size)
        weight_max = block.abs().max(dim=-1)[0].unsqueeze(-1)
        qweight = torch.argmin(torch.abs((block / weight_max).unsqueeze(-1) - table.reshape(1, -1)), dim=-1)
        return (table[qweight] * weight_max).reshape(weight.shape)

    _, weights = base_weights
    for name in ("transformer.h.1.attn.c_attn", "transformer.h.2.mlp.c_fc"):
        W, res = weights[name], weights[name].clone()
        for _ in range(3):
            dequantized = nf_quantizer_roundtrip(res)
            out = loftq_utils._low_rank_decomposition(W - dequantized, reduced_rank=8)
            L, R = out["L"], out["R"]
            res = W - torch.mm(L, R)
        q, B, A, _ = loftq_init(W, 8, "nf2", 3)
        assert torch.equal(q.dequantize(), dequantized) and torch.equal(B, L) and torch.equal(A, R), name


def test_error_never_increases_at_4_bits_on_the_base_weights(base_weights):
    base, _ = base_weights
    curves = error_curves(base, LoftQConfig(quant_type="nf4"), num_iter=5)
    assert len(curves) == 16
    for name, c in curves.items():
        assert all(b <= a for a, b in zip(c, c[1:])), (name, c)


@pytest.mark.parametrize("quant_type", ["nf2", "int2"])
def test_error_at_2_bits_falls_for_two_steps_and_stays_below_qlora(quant_type, base_weights):
    """At 2 bits the error is not monotone for ever: it falls for the first steps, then can creep up (e_3 > e_2 in
    one int2 layer, e_5 > e_4 in some nf2 layers; see test_a_rise_means_q_N_is_not_the_nearest_quantized_point)."""
    base, _ = base_weights
    for name, c in error_curves(base, LoftQConfig(quant_type=quant_type), num_iter=6).items():
        assert c[0] > c[1] > c[2], (name, c)  # t = 0 (QLoRA), 1, 2
        assert max(c[1:]) < c[0], (name, c)  # every t beats QLoRA's error


@pytest.mark.parametrize("quant_type", ["nf4", "nf2", "int2"])
def test_loftq_error_is_below_qlora_error(quant_type, base_weights):
    _, weights = base_weights
    for name, W in weights.items():
        q, B, A, errors = loftq_init(W, 8, quant_type, num_iter=1)
        qlora_error = (W - quantize(W, quant_type).dequantize()).norm()
        assert (W - q.dequantize() - B @ A).norm() < qlora_error, name
        assert errors[0] == pytest.approx(qlora_error.item())


def test_a_rise_means_q_N_is_not_the_nearest_quantized_point(base_weights):
    """SVD is the best rank-r fit, so a rise e_{t+1} > e_t can only come from the quantization step: for
    X = W − B_t A_t, q_N(X) (absmax scale, nearest code) is farther from X than Q_t, another point of the same set."""
    _, weights = base_weights
    W = weights["transformer.h.1.attn.c_proj"]
    errors = loftq_init(W, 8, "nf2", num_iter=6)[3]
    t = next(t for t in range(1, 6) if errors[t + 1] > errors[t])  # the first rise (e_5 > e_4 here)
    q_t, B, A, _ = loftq_init(W, 8, "nf2", num_iter=t)
    X = W - B @ A
    assert (X - quantize(X, "nf2").dequantize()).norm() > (X - q_t.dequantize()).norm()


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="quant_type"):
        LoftQConfig(quant_type="nf3")
    with pytest.raises(ValueError, match="loftq_iter"):
        LoftQConfig(loftq_iter=-1)
    with pytest.raises(ValueError, match="fused_qkv"):
        LoftQConfig(fused_qkv=["q", "v"])
    with pytest.raises(ValueError, match="r between 1 and 32"):
        loftq_init(torch.randn(64, 32), 33)


# ------------------------------------------------------------------------ attaching
@pytest.mark.parametrize("quant_type", ["nf4", "nf2"])
def test_attach_holds_Q_T_and_starts_at_Q_T_plus_BA(quant_type):
    config = LoftQConfig(r=4, alpha=16, quant_type=quant_type, loftq_iter=2)  # scaling 4
    base, model = with_loftq(config)
    for name, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            assert isinstance(m.base_layer, LoftQLinear4bit) and m.base_layer.meta.quant_type == quant_type
            q, B, A, _ = loftq_init(base.get_submodule(name).weight, 4, quant_type, 2)
            assert torch.equal(m.base_layer.weight, q.dequantize())  # the frozen base is Q_T
            x = torch.randn(3, m.base_layer.in_features)
            expected = F.linear(x, q.dequantize() + B @ A, m.base_layer.bias)  # (Q_T + B_T A_T) x + b
            with torch.no_grad():
                torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-5)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]


def test_scaling_is_divided_out_unlike_peft():
    base, model = with_loftq(LoftQConfig(r=4, alpha=16, targets=["c_attn"]))  # s = alpha/r = 4
    m = model.transformer.h[0].attn.c_attn
    _, B, A, _ = loftq_init(base.transformer.h[0].attn.c_attn.weight, 4)
    assert m.scaling["default"] == 4
    torch.testing.assert_close(m.lora_B["default"].weight, B / 2, rtol=0, atol=0)  # B_T/√s
    torch.testing.assert_close(m.lora_A["default"].weight, A / 2, rtol=0, atol=0)  # A_T/√s
    torch.testing.assert_close(m.delta_weight("default"), B @ A, rtol=0, atol=1e-7)  # PEFT's B_T, A_T would give 4·B_T A_T


def test_loftq_iter_0_is_qlora_init_on_the_same_quantization():
    base, qlora_model = tiny(), None
    torch.manual_seed(1)
    qlora_model = attach(copy.deepcopy(base), QLoRAConfig(r=4, alpha=8, double_quant=True))
    torch.manual_seed(1)
    loftq0 = attach(copy.deepcopy(base), LoftQConfig(r=4, alpha=8, double_quant=True, loftq_iter=0))
    assert torch.equal(logits(loftq0, tokens()), logits(qlora_model, tokens()))
    for (n, p), (n2, p2) in zip(qlora_model.named_parameters(), loftq0.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n  # A Kaiming from the same seed, B = 0


@pytest.mark.parametrize("quant_type", ["nf2", "int2", "nf4"])
def test_init_is_closer_to_the_original_model_than_qlora_init(quant_type):
    base, loftq_model = with_loftq(LoftQConfig(r=8, alpha=16, quant_type=quant_type, loftq_iter=3))
    qlora_init = attach(copy.deepcopy(base), LoftQConfig(r=8, alpha=16, quant_type=quant_type, loftq_iter=0))
    x, ref = tokens(), logits(base, tokens())
    assert (logits(loftq_model, x) - ref).norm() < (logits(qlora_init, x) - ref).norm()


def test_identity_at_init_is_false_by_design():
    base, model = with_loftq()
    assert LoftQConfig.identity_at_init is False
    assert not torch.allclose(logits(model, tokens()), logits(base, tokens()), atol=1e-4)  # Q_T + BA ≠ W


def test_training_moves_A_B_only_and_the_2bit_buffers_stay():
    _, model = with_loftq(LoftQConfig(r=4, alpha=8, quant_type="int2"))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("compute_dtype", ["auto", "bf16"])
def test_2bit_forward_where_the_triton_kernel_would_run(monkeypatch, compute_dtype):
    """TRITON_INTERPRET=1 makes QLoRA's path pick the Triton kernel, which knows nf4.CODES only: a 2-bit layer takes
    the reference dequantize instead, with the same outputs (in the same dtype) and gradients."""
    pytest.importorskip("triton", reason="triton not installed")
    _, model = with_loftq(LoftQConfig(r=4, alpha=8, quant_type="nf2", compute_dtype=compute_dtype))
    layer = model.transformer.h[0].mlp.c_fc.base_layer
    x = torch.randn(2, 5, 64, requires_grad=True)
    y_ref = layer(x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    y = layer(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y, y_ref) and torch.allclose(g, g_ref, atol=1e-6) and torch.equal(layer.weight, layer.quant.dequantize())


# ------------------------------------------------------------------------ files
@pytest.mark.parametrize("quant_type", ["nf4", "nf2"])
def test_reload_reproduces_Q_T_the_init_and_the_trained_logits(quant_type, tmp_path):
    config = LoftQConfig(r=4, alpha=8, quant_type=quant_type, loftq_iter=2)
    base, model = with_loftq(config)
    again = attach(copy.deepcopy(base), config)  # Alg. 1 is deterministic: same Q_T, same A, B
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    train_steps(model)
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["minilora_method"] == "loftq" and raw["init_lora_weights"] is True
    assert raw["minilora_loftq"] == {"loftq_bits": 4 if quant_type == "nf4" else 2, "loftq_iter": 2,
                                     "quant_type": quant_type}
    assert (raw["minilora_quantization"] is None) == (quant_type != "nf4")
    fresh = load_adapter(copy.deepcopy(base), tmp_path)  # the original base: Alg. 1 runs again, then A, B load
    assert fresh.minilora_config == config
    buffers = dict(model.named_buffers())
    assert all(torch.equal(v, buffers[k]) for k, v in fresh.named_buffers())
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))


def test_dequantized_base_is_Q_T_and_nf4_maps_it_to_itself():
    base, model = with_loftq(LoftQConfig(r=4, alpha=8, loftq_iter=2))
    plain = dequantized_base(model)
    assert plain.minilora_config is None and not any(isinstance(m, QLoRALinear) for m in plain.modules())
    for name, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            Q = plain.get_submodule(name).weight.detach()
            assert torch.equal(Q, m.base_layer.weight)
            assert torch.equal(quantize_nf4(Q, double_quant=False).dequantize(), Q)  # re-quantizing Q_T is exact


@pytest.mark.usefixtures("bnb_reference_cpu_path")
def test_peft_runs_our_adapter_on_the_Q_T_base_in_4bit(tmp_path):
    """PEFT's LoftQ flow: save the Q_T base, load it with bitsandbytes NF4 (it maps Q_T to itself), load the adapter."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    peft = pytest.importorskip("peft", reason="peft not installed")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    transformers.utils.logging.disable_progress_bar()
    _, model = with_loftq(LoftQConfig(r=4, alpha=8, loftq_iter=2))
    train_steps(model)
    save_adapter(model, tmp_path / "adapter")
    dequantized_base(model).save_pretrained(tmp_path / "base", hf=True)
    raw = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["minilora_quantization"]
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=raw["bnb_4bit_quant_type"],
                                                 bnb_4bit_use_double_quant=raw["bnb_4bit_use_double_quant"],
                                                 bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about minilora's extra config keys, then ignores them
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config,
                                                               dtype=torch.float32, device_map={"": "cpu"})
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        with torch.no_grad():
            their_logits = theirs(tokens()).logits
    torch.testing.assert_close(their_logits, logits(model, tokens()), rtol=0, atol=1e-5)
