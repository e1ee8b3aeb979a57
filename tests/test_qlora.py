"""QLoRA (minilora/qlora.py): Linear4bit's forward and backward against their references and against
bitsandbytes, what attaching quantizes, the claims of the module docstring, merge modes, the memory arithmetic
of lessons/05-qlora.md, and PEFT + bitsandbytes loading our adapter (skipped when they are not installed)."""
import copy
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import minilora
from minilora import GPT, GPTConfig, attach, load_adapter, merge_and_unload, save_adapter, unmerge
from minilora import qlora
from minilora.attach import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from minilora.checkpoint import load_safetensors
from minilora.lora import LoRAConfig
from minilora.nf4 import CODES, block_scales, dequantize_nf4, quantize_nf4
from minilora.paged_adamw import PagedAdamW
from minilora.qlora import Linear4bit, QLoRAConfig, QLoRALinear

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=64, vocab_size=128, block_size=32)
LESSON = Path(__file__).resolve().parent.parent / "lessons" / "05-qlora.md"


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def with_qlora(config=None, seed=0):
    base = tiny(seed)
    return base, attach(copy.deepcopy(base), config or QLoRAConfig(r=4, alpha=8))


def tokens(B=4, T=24, seed=0):
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


def layer(d_out=96, d_in=50, double_quant=True, seed=0, **kw):  # 4800 weights: 75 blocks, the last c1 block partial
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(d_out, d_in, generator=g) * 0.02, torch.randn(d_out, generator=g) * 0.01
    return Linear4bit(w, nn.Parameter(b, requires_grad=False), double_quant=double_quant, **kw), w, b


# ------------------------------------------------------------------------ Linear4bit
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(96, 50), (33, 47)])  # 33·47 = 1551: a partial last block of 64
def test_linear4bit_forward_equals_f_linear_with_the_dequantized_weight(double_quant, shape):
    lin, w, b = layer(*shape, double_quant=double_quant)
    x = torch.randn(3, 5, shape[1])
    W = dequantize_nf4(quantize_nf4(w, double_quant=double_quant), torch.float32)
    assert torch.equal(lin(x), F.linear(x, W, b))
    assert torch.equal(lin.weight, W) and lin.packed.dtype == torch.uint8


def test_linear4bit_backward_dx_equals_the_reference_and_the_weight_gets_none():
    lin, w, b = layer()
    lin.bias.requires_grad_(True)
    x = torch.randn(3, 5, 50, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    b_ref = b.clone().requires_grad_()
    g = torch.randn(3, 5, 96)
    lin(x).backward(g)
    F.linear(x_ref, lin.weight, b_ref).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-7)
    torch.testing.assert_close(lin.bias.grad, b_ref.grad, rtol=0, atol=1e-6)
    assert [n for n, _ in lin.named_parameters()] == ["bias"]  # W is buffers: no gradient can exist


def saved_tensors(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return saved, out


def test_no_full_precision_weight_is_saved_for_backward():
    lin, w, _ = layer()
    x = torch.randn(3, 5, 50, requires_grad=True)
    saved, _ = saved_tensors(lambda: lin(x))
    assert {t.data_ptr() for t in saved} == {lin.packed.data_ptr(), lin.absmax.data_ptr(),
                                            lin.absmax_scale.data_ptr(), lin.absmax_offset.data_ptr()}
    assert all(t.numel() < w.numel() for t in saved)  # packed holds n/2 bytes
    dense = nn.Linear(50, 96)  # the check would catch a saved weight: nn.Linear saves (a view of) its weight
    assert any(t.numel() == w.numel() and t.is_floating_point() for t in saved_tensors(lambda: dense(x))[0])


def test_no_saved_tensor_has_a_quantized_weight_shape_in_the_whole_model():
    _, model = with_qlora()
    shapes = {m.meta.shape for m in model.modules() if isinstance(m, Linear4bit)}
    model.train()
    x, y = tokens(4, 20), tokens(4, 20, seed=1)  # T = 20: no activation numel equals a weight's
    saved, (_, loss) = saved_tensors(lambda: model(x, y))
    sizes = {s[0] * s[1] for s in shapes}  # (a view of) a weight has its numel; no activation here does
    assert shapes and not [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() in sizes]
    loss.backward()  # and backward still works from what was saved


def test_compute_dtype_bf16_and_autocast():
    lin, w, b = layer(compute_dtype="bf16")
    x = torch.randn(2, 50)
    W = dequantize_nf4(quantize_nf4(w), torch.bfloat16)
    assert torch.equal(lin(x), F.linear(x.bfloat16(), W, b.bfloat16()).float())  # returned in x's dtype
    auto, _, _ = layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert auto(x).dtype == torch.bfloat16  # under autocast: autocast's dtype, as nn.Linear


def test_to_moves_buffers_and_half_keeps_the_fp32_constants():
    lin, _, _ = layer()
    before = lin.weight
    assert set(lin.state_dict()) == {"packed", "absmax", "absmax_scale", "absmax_offset", "bias"}
    lin.bfloat16()
    assert lin.absmax_scale.dtype == lin.absmax_offset.dtype == torch.float32 and lin.bias.dtype == torch.bfloat16
    assert torch.equal(lin.weight, before)  # the dequantized weight did not change


# ------------------------------------------------------------------------ parity with bitsandbytes
def test_equals_bitsandbytes_linear4bit_and_matmul_4bit():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: no parity check")
    lin, w, b = layer(96, 64)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.view(-1), lin.packed)  # the same packed weight
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    theirs = bnb.matmul_4bit(x_ref, packed.t(), quant_state=state, bias=b)
    ours = lin(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    module = bnb.nn.Linear4bit(64, 96, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    module.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                      compress_statistics=True)
    module.bias = nn.Parameter(b.clone())
    with torch.no_grad():
        torch.testing.assert_close(module.to("cpu")(x), lin(x), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------ attaching
def test_attach_quantizes_exactly_the_targets():
    base, model = with_qlora()
    quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    linears = {n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert quantized == {n + ".base_layer" for n in linears}  # all-linear by default
    assert all(isinstance(model.get_submodule(n), QLoRALinear) for n in linears)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.transformer.wte.weight  # tied, 16 bit
    sd = model.state_dict()
    for k, v in base.state_dict().items():  # embeddings, LayerNorms, the head, biases: untouched
        module, _, leaf = k.rpartition(".")
        if module not in linears:
            assert torch.equal(sd[k], v), k
        elif leaf == "bias":
            assert torch.equal(sd[f"{module}.base_layer.bias"], v), k
    _, only = with_qlora(QLoRAConfig(targets=["c_attn"]))
    assert {n for n, m in only.named_modules() if isinstance(m, Linear4bit)} == {
        f"transformer.h.{i}.attn.c_attn.base_layer" for i in range(CFG.n_layer)}
    assert type(only.transformer.h[0].mlp.c_fc) is nn.Linear


def test_qlora_at_init_equals_the_nf4_quantized_base():
    base, model = with_qlora()
    quantized = copy.deepcopy(base)
    with torch.no_grad():
        for n, m in quantized.named_modules():
            if isinstance(m, nn.Linear) and n != "lm_head":
                m.weight.copy_(dequantize_nf4(quantize_nf4(m.weight)))
    x = tokens()
    assert torch.equal(logits(model, x), logits(quantized, x))  # exactly, not to a tolerance
    assert not torch.allclose(logits(model, x), logits(base, x), atol=1e-4)  # and not the original base
    assert QLoRAConfig.identity_at_init is False


def test_a_few_steps_lower_the_loss_and_leave_the_nf4_buffers_alone():
    _, model = with_qlora(QLoRAConfig(r=8, alpha=16))
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x, y = tokens(8, 24), tokens(8, 24, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def test_paged_optimizer_hook():
    _, model = with_qlora(QLoRAConfig(paged_optimizer=True))
    opt = model.minilora_config.optimizer(model, 1e-3, 0.1)
    assert isinstance(opt, PagedAdamW) and opt.param_groups[0]["weight_decay"] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
    assert QLoRAConfig().optimizer(model, 1e-3, 0.1) is None  # default: the loop's AdamW


def test_config_rejects_an_unknown_compute_dtype():
    with pytest.raises(ValueError, match="compute_dtype"):
        QLoRAConfig(compute_dtype="fp8")


# ------------------------------------------------------------------------ saving
def test_save_load_holds_the_adapter_only_with_peft_lora_fields(tmp_path):
    _, model = with_qlora()
    randomize(model)
    save_adapter(model, tmp_path)
    state = load_safetensors(tmp_path / ADAPTER_WEIGHTS)
    assert state and all(re.search(r"\.lora_[AB]\.weight$", k) for k in state)  # no NF4 base in the file
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["peft_type"] == "LORA" and raw["target_modules"] == "all-linear" and raw["fan_in_fan_out"] is False
    assert raw["minilora_quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert QLoRAConfig.from_json(raw) == model.minilora_config
    fresh = load_adapter(tiny(), tmp_path)
    assert isinstance(fresh.minilora_config, QLoRAConfig)
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))


# ------------------------------------------------------------------------ merging
def test_merge_dequant_is_exact_and_unmerge_restores_the_4bit_layer():
    _, model = with_qlora()
    randomize(model)
    x = tokens()
    before, buffers = logits(model, x), {k: v.clone() for k, v in model.named_buffers()}
    qlora.merge(model, "dequant")
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=1e-5)
    qlora.merge(model, "dequant")  # idempotent
    unmerge(model)
    assert torch.equal(logits(model, x), before)
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    minilora.merge(model)  # the generic merge uses the dequant mode
    torch.testing.assert_close(logits(model, x), before, rtol=0, atol=1e-5)
    unmerge(model)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, (Linear4bit, QLoRALinear)) for m in plain.modules())
    torch.testing.assert_close(logits(plain, x), before, rtol=0, atol=1e-5)


def test_merge_original_is_w0_plus_delta_and_equals_lora_on_the_original_base():
    base, model = with_qlora()
    randomize(model)
    lora_model = attach(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, targets="all-linear"))
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # the same A, B on the unquantized base
        for n, p in lora_model.named_parameters():
            if p.requires_grad:
                p.copy_(trained.pop(n))
    assert not trained
    qlora.merge(model, "original", original=base.state_dict())
    m = model.transformer.h[0].attn.c_attn
    assert torch.equal(m.base_layer.weight, base.transformer.h[0].attn.c_attn.weight + m.delta_weight("default"))
    torch.testing.assert_close(logits(model, tokens()), logits(lora_model, tokens()), rtol=0, atol=1e-5)
    unmerge(model)
    with pytest.raises(ValueError, match="original="):
        qlora.merge(model, "original")


def test_merge_requantize_error_is_bounded_and_nonzero():
    _, model = with_qlora()
    randomize(model, std=0.02)
    m = model.transformer.h[1].mlp.c_fc
    target = m.base_layer.quant.dequantize(torch.float32) + m.delta_weight("default")  # what NF4 must now hold
    qlora.merge(model, "requantize")
    q = m.base_layer.quant
    err = (q.dequantize(torch.float32) - target).abs().reshape(-1, q.block_size)  # (nb, 64)
    absmax = target.abs().reshape(-1, q.block_size).amax(1)  # the true c2 of each block
    half_gap = (CODES["nf4"].diff().max() / 2).item()  # rounding to the nearest code: ≤ half the widest gap
    bound = half_gap * absmax + (block_scales(q) - absmax).abs()  # + |c2' − c2| from double quant
    assert (err.amax(1) <= bound * (1 + 1e-6)).all() and err.max() > 0
    unmerge(model)
    report = qlora.merge_report(model, tokens(), original=None)
    assert set(report) == {"unmerged", "dequant", "requantize"}
    assert report["dequant"]["max_abs_dlogits"] < 1e-5
    assert 1e-4 < report["requantize"]["max_abs_dlogits"] and 0 < report["requantize"]["kl"] < 1e-2


def test_merge_report_with_the_original_weights():
    base, model = with_qlora()
    randomize(model)
    report = qlora.merge_report(model, tokens(), original=base.state_dict())
    assert {"max_abs_dlogits", "kl", "ppl", "dppl"} <= report["original"].keys()
    assert report["original"]["max_abs_dlogits"] > report["dequant"]["max_abs_dlogits"]  # W0 ≠ dequant(W4)


# ------------------------------------------------------------------------ memory arithmetic (lesson 05)
def test_bits_per_param_and_weight_memory():
    assert qlora.weight_memory_gb(1e9, 16) == 2.0
    assert abs(qlora.weight_memory_gb(65e9, "nf4") - 65e9 * (4 + 8 / 64 + 32 / 64 / 256) / 8 / 1e9) < 1e-12
    row = qlora.memory_table([65e9])[0]
    assert abs(row["dq_saves"] - 3.03) < 0.01  # paper §3: ≈3 GB at 65B
    assert row["full_ft_16bit"] == 780  # paper: "more than 780 GB" for 16-bit finetuning of LLaMA 65B


def test_lesson_memory_table_numbers_are_computed():
    text = LESSON.read_text()
    for row in qlora.memory_table():
        line = next((ln for ln in text.splitlines() if ln.startswith(f"| {row['params_b']:g}B |")), None)
        assert line is not None, f"no row for {row['params_b']:g}B in {LESSON.name}"
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1:] == [f"{row[k]:.2f}" for k in ("bf16", "nf4", "nf4_dq", "dq_saves")] + [
            f"{row['full_ft_16bit']:.0f}"], line


def test_lesson_quotes_the_measured_dequant_results():
    results = json.loads((LESSON.parent.parent / "data" / "results" / "bench_dequant.json").read_text())
    text = LESSON.read_text()
    assert results["device"] in text and results["versions"]["torch"] in text
    triton = [r for r in results["rows"] if r["method"] == "triton" and r["double_quant"]]
    for r in triton:
        assert f"{r['us_median']:.1f} µs" in text and f"{r['pct_copy_bw']:.0f} %" in text


# ------------------------------------------------------------------------ PEFT + bitsandbytes load our adapter
@pytest.mark.usefixtures("bnb_reference_cpu_path")
def test_peft_loads_our_adapter_onto_a_bitsandbytes_4bit_gpt2(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    peft = pytest.importorskip("peft", reason="peft not installed")
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    transformers.utils.logging.disable_progress_bar()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny(seed=3).save_pretrained(base_dir, hf=True)
    ours = randomize(attach(GPT.from_pretrained(base_dir), QLoRAConfig(r=4, alpha=8)))
    save_adapter(ours, adapter_dir)
    raw = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())["minilora_quantization"]
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=raw["bnb_4bit_quant_type"], bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=raw["bnb_4bit_use_double_quant"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about minilora's extra config keys, then ignores them
        hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config,
                                                               dtype=torch.float32, device_map={"": "cpu"})
        theirs = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
        with torch.no_grad():
            their_logits = theirs(tokens()).logits
    torch.testing.assert_close(their_logits, logits(ours, tokens()), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------ on a GPU (skipped on CPU)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Triton dequant and bf16 autocast path")


@cuda
def test_cuda_forward_backward_under_autocast_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: no parity check")
    lin, w, b = layer(384, 128)
    lin.cuda()
    w, b = w.cuda(), b.cuda()
    x = torch.randn(4, 16, 128, device="cuda", requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ours = lin(x)
    W = dequantize_nf4(quantize_nf4(w), torch.bfloat16)  # the PyTorch reference of the Triton kernel
    assert ours.dtype == torch.bfloat16 and torch.equal(lin.weight.bfloat16(), W)
    torch.testing.assert_close(ours, F.linear(x.bfloat16(), W, b.bfloat16()), rtol=0, atol=0)
    packed, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed.view(-1), lin.packed)
    theirs = bnb.matmul_4bit(x_ref.bfloat16(), packed.t(), quant_state=state, bias=b.bfloat16())
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-3)  # bnb's double-quant dequant rounds differently
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=2e-3)


@cuda
def test_cuda_qlora_trains_under_autocast_and_saves_no_dense_weight():
    _, model = with_qlora(QLoRAConfig(r=8, alpha=16, paged_optimizer=True))
    model.cuda().bfloat16()  # a 16-bit base: .bfloat16() must leave the fp32 quantization constants alone
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    assert all(m.absmax_scale.dtype == torch.float32 for m in model.modules() if isinstance(m, Linear4bit))
    opt = model.minilora_config.optimizer(model, 1e-2, 0.0)
    x, y = tokens(8, 20).cuda(), tokens(8, 20, seed=1).cuda()
    sizes = {m.meta.numel() for m in model.modules() if isinstance(m, Linear4bit)}
    model.train()
    losses = []
    for i in range(15):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            saved, (_, loss) = saved_tensors(lambda: model(x, y))
        assert not [t.shape for t in saved if t.is_floating_point() and t.numel() in sizes]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
