"""QA-LoRA (minilora/qa_lora.py): eq. 1's group-wise INT-N quantizer, the pooled LoRA branch, the merge into the
zero points (codes and scales untouched, outputs unchanged), unmerge, the contrast with merging QLoRA and
re-quantizing, and the errors the docstring promises."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F

import minilora
from minilora import GPT, GPTConfig, attach, load_adapter, merge_and_unload, save_adapter, unmerge
from minilora.attach import ADAPTER_CONFIG
from minilora.checkpoint import CheckpointError
from minilora.lora import adapter_rows, disable_adapters
from minilora.qa_lora import (LinearIntN, QALoRAConfig, QALoRALinear, dequantize_groupwise, quantize_groupwise,
                              quantize_linears)
from minilora.qlora import QLoRAConfig

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=128, block_size=32)
MERGE_ATOL = 1e-5  # merged vs unmerged logits (|logits| ~ 1): only float rounding of β + s·BA and the matmul order


def tiny(seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def with_qa_lora(config=None, seed=0):
    base = tiny(seed)
    return base, attach(copy.deepcopy(base), config or QALoRAConfig(group_size=16))


def tokens(B=3, T=16, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=1, std=0.05):
    """Nonzero A and B, as after training (at init B = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QALoRALinear)}


# ------------------------------------------------------------------------ eq. 1: the quantizer
def test_quantize_follows_eq1_by_hand():
    W = torch.tensor([[0.0, 0.1, 0.2, 0.7, -1.0, -1.0, -1.0, -1.0]])  # two groups of g = 4, N = 2
    q, alpha, beta = quantize_groupwise(W, bits=2, group_size=4)
    assert torch.allclose(alpha, torch.tensor([[0.7 / 3, 0.0]])) and torch.equal(beta, torch.tensor([[0.0, -1.0]]))
    assert q.tolist() == [[0, 0, 1, 3, 0, 0, 0, 0]]  # round(0.1 / 0.233) = 0, round(0.857) = 1; a constant group: 0
    assert torch.allclose(dequantize_groupwise(q, alpha, beta), torch.tensor([[0, 0, 0.7 / 3, 0.7, -1, -1, -1, -1]]))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [8, 32])
def test_round_trip_error_is_at_most_half_a_step(bits, group_size):
    W = torch.randn(48, 96, generator=torch.Generator().manual_seed(bits)) * 0.02
    q, alpha, beta = quantize_groupwise(W, bits, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) == 2**bits - 1 and int(q.min()) == 0
    assert alpha.shape == beta.shape == (48, 96 // group_size)
    err = (dequantize_groupwise(q, alpha, beta) - W).abs()  # (d_out, d_in)
    half_step = (alpha / 2).repeat_interleave(group_size, dim=1)  # α/2 of each weight's group
    assert (err <= half_step * (1 + 1e-5) + 1e-9).all()
    assert (err > 0.4 * half_step).any()  # the bound is nearly reached: not a vacuous check
    lo = W.reshape(48, -1, group_size).amin(-1)
    assert torch.equal(beta, lo)  # β = min, and the minimum itself is exact (code 0)


# ------------------------------------------------------------------------ the layer and the pooled branch
def test_linear_int_forward_and_backward_equal_f_linear_with_the_dequantized_weight():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 64, generator=g) * 0.02, torch.randn(40, generator=g) * 0.01
    lin = LinearIntN(w, torch.nn.Parameter(b), bits=4, group_size=16)
    W = dequantize_groupwise(*quantize_groupwise(w, 4, 16))
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = lin(x), F.linear(x_ref, W, b)
    assert torch.allclose(y, y_ref, atol=1e-6) and torch.equal(lin.weight, W)
    (y * torch.arange(40.0)).sum().backward()
    (y_ref * torch.arange(40.0)).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6) and lin.bias.grad is not None


def test_no_float_weight_is_saved_for_backward():
    lin = LinearIntN(torch.randn(40, 64) * 0.02, None, bits=4, group_size=16)
    saved = []
    x = torch.randn(2, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lin(x).sum().backward()
        F.linear(x, lin.weight).sum()  # control: F.linear keeps its (d_out, d_in) float weight
    floats = [t for t in saved if t.is_floating_point() and t.numel() == 40 * 64]  # a W or Wᵀ
    assert len(floats) == 1  # only the control's: the INT layer kept uint8 codes, α and β
    assert any(t.dtype == torch.uint8 for t in saved)


@pytest.mark.parametrize("pool", ["sum", "mean"])
def test_pooling_equation(pool):
    """y = W̃x + b + s·B A pool(x), pool = the sum (or mean) of each group of g inputs; equivalently LoRA whose A
    repeats each column g times (the paper: rows of A equal within a group)."""
    _, model = with_qa_lora(QALoRAConfig(group_size=16, pool=pool))
    randomize(model)
    m = model.transformer.h[0].mlp.c_proj  # d_in 256: 16 groups
    x = torch.randn(2, 5, 256)
    B, A = m.lora_B["default"].weight, m.lora_A["default"].weight  # (d_out, r), (r, 16)
    s, g = m.scaling["default"], 16
    pooled = torch.stack([x[..., l * g:(l + 1) * g].sum(-1) for l in range(256 // g)], -1)  # (2, 5, 16)
    pooled = pooled if pool == "sum" else pooled / g
    with torch.no_grad():
        expected = m.base_layer(x) + s * pooled @ A.T @ B.T
        assert torch.allclose(m(x), expected, atol=1e-6)
        A_full = A.repeat_interleave(g, dim=1) / (1 if pool == "sum" else g)  # (r, d_in)
        assert torch.allclose(m(x), m.base_layer(x) + s * x @ A_full.T @ B.T, atol=1e-5)
        assert torch.allclose(m.delta_weight("default"), s * B @ A_full, atol=1e-7)


def test_a_has_d_in_over_g_inputs_and_the_count_follows_the_formula():
    cfg = QALoRAConfig(group_size=16)
    base, model = with_qa_lora(cfg)
    for name, m in layers(model).items():
        assert m.lora_A["default"].weight.shape == (cfg.r, m.base_layer.in_features // 16), name
    shapes = [(m.in_features, m.out_features) for n, m in base.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert model.num_params(trainable_only=True) == sum(cfg.r * (d_in // 16 + d_out) for d_in, d_out in shapes)


def test_rank_of_the_update_is_at_most_the_number_of_groups():
    _, model = with_qa_lora(QALoRAConfig(group_size=32, r=8))  # c_attn: d_in 64 -> 2 groups
    randomize(model)
    delta = model.transformer.h[0].attn.c_attn.delta_weight("default")  # (192, 64)
    assert torch.linalg.matrix_rank(delta) == 2  # min(r, d_in/g) = min(8, 2)


def test_at_init_equals_the_int_quantized_base():
    base, model = with_qa_lora(QALoRAConfig(group_size=16))
    quantized = quantize_linears(copy.deepcopy(base), bits=4, group_size=16)
    x = tokens()
    assert torch.equal(logits(model, x), logits(quantized, x))  # B = 0: exactly the INT4 base
    assert not torch.allclose(logits(model, x), logits(base, x), atol=1e-4)  # ...which is not the original


def test_only_the_adapter_trains():
    _, model = with_qa_lora()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert all(b.dtype == torch.uint8 for n, b in model.named_buffers() if n.endswith("qweight"))


# ------------------------------------------------------------------------ merging into the zero points
@pytest.mark.parametrize("config", [QALoRAConfig(group_size=16), QALoRAConfig(group_size=8, pool="mean", bits=3),
                                    QALoRAConfig(group_size=16, fused_qkv=["q", "v"], bits=2)],
                         ids=["int4-sum", "int3-mean", "int2-fused-qv"])
def test_merge_changes_only_the_zero_points(config):
    _, model = with_qa_lora(config)
    randomize(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shifts = {n: m.zero_shift("default") for n, m in layers(model).items()}
    minilora.merge(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{n}.base_layer.zeros" for n in shifts}  # codes, scales, biases, A, B: bit-identical
    for n, shift in shifts.items():
        assert torch.allclose(after[f"{n}.base_layer.zeros"] - before[f"{n}.base_layer.zeros"], shift, atol=1e-7)


@pytest.mark.parametrize("config", [QALoRAConfig(group_size=16), QALoRAConfig(group_size=8, pool="mean", bits=3),
                                    QALoRAConfig(group_size=16, fused_qkv=["q", "v"], bits=2)],
                         ids=["int4-sum", "int3-mean", "int2-fused-qv"])
def test_merged_int_model_equals_the_unmerged_model(config):
    _, model = with_qa_lora(config)
    randomize(model)
    x = tokens()
    ref = logits(model, x)
    codes = {n: m.base_layer.qweight.clone() for n, m in layers(model).items()}
    plain = merge_and_unload(copy.deepcopy(model))  # a plain GPT whose linears are still INT-N
    assert torch.allclose(logits(plain, x), ref, atol=MERGE_ATOL)
    for n, q in codes.items():
        m = plain.get_submodule(n)
        assert isinstance(m, LinearIntN) and torch.equal(m.qweight, q) and int(m.qweight.max()) < 2**config.bits
    at_init = logits(with_qa_lora(config)[1], x)  # B = 0
    assert (ref - at_init).abs().max() > 1e-3  # the merged adapter really changed the outputs


def test_unmerge_restores_the_zero_points_bit_for_bit_and_merge_is_idempotent():
    _, model = with_qa_lora()
    randomize(model)
    x = tokens()
    ref = logits(model, x)
    zeros = {n: m.base_layer.zeros.clone() for n, m in layers(model).items()}
    minilora.merge(model)
    once = {n: m.base_layer.zeros.clone() for n, m in layers(model).items()}
    minilora.merge(model)  # a second merge does nothing
    assert all(torch.equal(m.base_layer.zeros, once[n]) for n, m in layers(model).items())
    unmerge(model)
    assert all(torch.equal(m.base_layer.zeros, zeros[n]) and m.unmerged_zeros is None for n, m in layers(model).items())
    assert torch.equal(logits(model, x), ref)
    assert "unmerged_zeros" not in " ".join(model.state_dict())  # never saved


def test_mixed_batch_rows_equal_each_row_alone():
    _, model = with_qa_lora()
    randomize(model)
    x = tokens(B=2)
    with torch.no_grad(), adapter_rows(model, ["default", "__base__"]):
        mixed = model(x)[0]
    with torch.no_grad(), disable_adapters(model):
        base_row = model(x[1:])[0]
    assert torch.allclose(mixed[:1], logits(model, x[:1]), atol=1e-6)
    assert torch.allclose(mixed[1:], base_row, atol=1e-6)


def test_merge_is_refused_inside_disable_adapters():
    _, model = with_qa_lora()
    with disable_adapters(model), pytest.raises(ValueError, match="disable_adapters"):
        minilora.merge(model)


def test_qlora_merged_then_requantized_is_not_exact_but_qa_lora_merged_is():
    """The paper's contrast (Table 1's "QLoRA w/ GPTQ" row, with this file's round-to-nearest quantizer)."""
    base = tiny()
    qlora = randomize(attach(copy.deepcopy(base), QLoRAConfig(r=8, alpha=16)))
    qa = randomize(attach(copy.deepcopy(base), QALoRAConfig(group_size=16)))
    x = tokens()
    ref_qlora, ref_qa = logits(qlora, x), logits(qa, x)
    requantized = quantize_linears(merge_and_unload(copy.deepcopy(qlora)), bits=4, group_size=16)
    assert all(isinstance(requantized.get_submodule(n), LinearIntN) for n in layers(qa))
    assert (logits(requantized, x) - ref_qlora).abs().max() > 100 * MERGE_ATOL  # a second rounding of every weight
    assert (logits(merge_and_unload(qa), x) - ref_qa).abs().max() < MERGE_ATOL


def test_saved_adapter_reloads_and_merges_alike(tmp_path):
    _, model = with_qa_lora(QALoRAConfig(group_size=8, bits=3, pool="mean"))
    randomize(model)
    save_adapter(model, tmp_path)
    fresh = load_adapter(tiny(), tmp_path)
    assert fresh.minilora_config == model.minilora_config
    x = tokens()
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert torch.equal(logits(minilora.merge(fresh), x), logits(minilora.merge(model), x))


# ------------------------------------------------------------------------ errors
def test_group_size_that_does_not_divide_d_in_is_a_clear_error():
    with pytest.raises(ValueError, match=r"g 32 does not divide d_in 100; pick a divisor of d_in \(e\.g\. 25\)"):
        quantize_groupwise(torch.randn(4, 100), 4, 32)
    model = tiny(cfg=GPTConfig(n_layer=1, n_head=2, n_embd=48, vocab_size=64, block_size=16))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"g 32 does not divide d_in 48 of transformer\.h\.0\.attn\.c_attn") as e:
        attach(model, QALoRAConfig())
    assert not isinstance(e.value, CheckpointError)
    assert not layers(model) and model.state_dict().keys() == before.keys()  # checked before anything changed


def test_adapter_for_another_model_names_the_group_size(tmp_path):
    _, model = with_qa_lora(QALoRAConfig())  # g = 32 fits n_embd 64
    save_adapter(model, tmp_path)
    other = tiny(cfg=GPTConfig(n_layer=2, n_head=2, n_embd=48, vocab_size=128, block_size=32))
    with pytest.raises(CheckpointError, match="another model.*g 32 does not divide d_in 48"):
        load_adapter(other, tmp_path)


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 5}, r"bits 5: .*pick one of \(2, 3, 4\)"), ({"bits": 8}, "INT2, INT3 or INT4"),
    ({"group_size": 0}, "positive int"), ({"pool": "max"}, "pick 'sum'"), ({"embedding": True}, "embedding=False")])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QALoRAConfig(**kwargs)


def test_non_finite_weight_is_a_clear_error():
    W = torch.randn(4, 32)
    W[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_groupwise(W)


def test_adapter_config_is_minilora_only(tmp_path):
    """PEFT's LORA type would read A (r, d_in/g) as a plain LoRA's A, and its use_qalora pools at another scale."""
    _, model = with_qa_lora()
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert "peft_type" not in raw and raw["minilora_method"] == "qa_lora"
    assert raw["minilora_config"]["group_size"] == 16 and raw["minilora_config"]["pool"] == "sum"
