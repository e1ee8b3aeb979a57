"""minilora/memory.py: the closed-form memory model against measurement, for every registered method.

On the CPU in fp32 every term is byte-exact: weights (NF4 buffers included), gradients, optimizer state (AdamW
moments, its 4-byte step counters, AdaLoRA's importance scores) and the activations autograd saves, with and
without activation checkpointing. test_estimate_within_5_percent_of_measurement is the tolerance the model
promises; test_every_term_is_byte_exact_on_cpu pins the exactness. measure_cuda's code runs on the CPU as well,
with memory.LiveBytes standing in for torch.cuda's allocator counters."""
import contextlib
import functools

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import minilora  # noqa: E402,F401  (registers the methods of minilora/__init__.py)
from minilora import METHODS, GPT, GPTConfig, attach  # noqa: E402
from minilora.adalora import AdaLoRAConfig  # noqa: E402
from minilora.adapters import AdapterConfig, PfeifferConfig  # noqa: E402
from minilora.dora import DoRAConfig, QDoRAConfig  # noqa: E402
from minilora.full import FullConfig  # noqa: E402
from minilora.lora import LoRAConfig  # noqa: E402
from minilora.memory import (CATEGORIES, LLAMA, MEMORY, PUBLISHED, LiveBytes, checkpointing,  # noqa: E402
                             estimate, gpt2_parameters, llama_estimate, measure, measure_cuda, measure_device,
                             nf4_bytes, plot_breakdown, plot_checkpointing, plot_projection, predict_cuda)
from minilora.nf4 import quantize_nf4  # noqa: E402
from minilora.prefix import PrefixConfig, prefix_param_count  # noqa: E402
from minilora.prompt import PromptConfig, prompt_param_count  # noqa: E402
from minilora.qlora import QLoRAConfig  # noqa: E402

CFGS = {"2x32": GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=64),
        "3x64": GPTConfig(n_layer=3, n_head=4, n_embd=64, vocab_size=80, block_size=64)}
SHAPES = {"2x32": (4, 12), "3x64": (3, 30)}  # (B, T): two configs, two batch sizes and lengths
NAMES = sorted(set(METHODS) & set(MEMORY))


def model_for(cfg, config, seed=0):
    torch.manual_seed(seed)
    return attach(GPT(cfg), config)


@functools.cache
def pair(method, cfg_name, ckpt):
    """(estimate, measurement) for a registered method's default config."""
    cfg, (B, T) = CFGS[cfg_name], SHAPES[cfg_name]
    got = measure(model_for(cfg, METHODS[method].config_cls()), B, T, checkpoint=ckpt)
    return estimate(method, cfg, B, T, checkpoint=ckpt), got


def test_every_registered_method_has_an_entry():
    missing = sorted(set(METHODS) - set(MEMORY))
    assert not missing, f"methods {missing} have no entry in minilora/memory.py::MEMORY: add one"


def test_method_without_an_entry_is_a_clear_error():
    with pytest.raises(ValueError, match=r"minilora/memory.py has no entry for method 'nope'"):
        estimate("nope", CFGS["2x32"], 2, 8)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("cfg_name", sorted(CFGS))
@pytest.mark.parametrize("method", NAMES)
def test_estimate_within_5_percent_of_measurement(method, cfg_name, ckpt):
    est, got = pair(method, cfg_name, ckpt)
    for k in CATEGORIES:
        assert abs(getattr(est, k) - getattr(got, k)) <= 0.05 * getattr(got, k), (k, est, got)


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("cfg_name", sorted(CFGS))
@pytest.mark.parametrize("method", NAMES)
def test_every_term_is_byte_exact_on_cpu(method, cfg_name, ckpt):
    est, got = pair(method, cfg_name, ckpt)
    assert est.as_dict() == got.as_dict()
    assert est.optimizer_on_host == got.optimizer_on_host


OPTIONS = [  # non-default configs: each branch of the formulas, measured
    ("full", FullConfig(layers=[1])),
    ("lora", LoRAConfig(targets="all-linear", layers=[1, 2], rank_pattern={"c_fc": 4})),
    ("lora", LoRAConfig(targets=["lm_head"])),  # no block has a backward
    ("lora", LoRAConfig(layers=[1, 2], targets=["c_fc", "mlp.c_proj"])),  # block 0 has none
    ("dora", DoRAConfig(targets="all-linear")),
    ("qlora", QLoRAConfig(double_quant=False, targets=["c_attn", "mlp.c_proj"])),
    ("qlora", QLoRAConfig(block_size=128, paged_optimizer=True)),
    ("qdora", QDoRAConfig(targets=["c_fc"])),
    ("adalora", AdaLoRAConfig(targets=["c_attn"], init_r=4, target_r=2)),
    ("adalora", AdaLoRAConfig(rank_pattern={"transformer.h.0.attn.c_attn": 0, "transformer.h.1.mlp.c_fc": 3})),
    ("houlsby", AdapterConfig(parallel=True)),
    ("houlsby", AdapterConfig(nonlinearity="relu", train_layernorms=False)),
    ("pfeiffer", PfeifferConfig(parallel=True, nonlinearity="gelu")),
    ("prefix", PrefixConfig(reparameterize=False)),
    ("prefix", PrefixConfig(num_virtual_tokens=3, hidden=16)),
    ("prompt", PromptConfig(num_virtual_tokens=5, encoder="mlp", encoder_hidden=24)),
]


@pytest.mark.parametrize("method,config", OPTIONS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(OPTIONS)])
def test_non_default_configs_are_byte_exact(method, config):
    cfg = CFGS["3x64"]
    for ckpt in (False, True):
        got = measure(model_for(cfg, config), 3, 20, checkpoint=ckpt)
        assert estimate(method, cfg, 3, 20, config, checkpoint=ckpt).as_dict() == got.as_dict(), ckpt


LATER = [  # options of methods minilora/__init__.py may not import yet: tested once they are registered
    ("vera", dict(r=16, targets="all-linear")),
    ("tied_lora", dict(tie="all", train_A=False, targets=["c_attn", "c_fc"])),
    ("tied_lora", dict(train_u=False, train_B=False)),
    ("qa_lora", dict(group_size=16, pool="mean", r=4)),
    ("llama_adapter", dict(adapter_layers=1, adapter_len=4)),
    ("loftq", dict(quant_type="nf2", double_quant=True)),
    ("lora_fa", dict(targets="all-linear", r=4)),
    ("pissa", dict(targets=["attn.c_proj"])),
    ("longlora", dict(shift=False)),  # S²-Attn at T = 20: G = 5 (and 6 below, the shifted half padded to 24)
    ("longlora", dict(group_size_ratio=0.3, targets=["c_attn"])),  # c_proj frozen: nothing keeps its input
    ("longlora", dict(s2_attn=False, context_factor=3)),  # full attention: SDPA's fused kernel, as LoRA's
    ("longlora", dict(train_embed_norm=False, context_factor=1)),  # plain LoRA's trainables, S²-Attn
    ("longlora", dict(group_size_ratio=1.0)),  # one group: ordinary causal attention
]


@pytest.mark.parametrize("method,options", LATER, ids=[f"{m}-{i}" for i, (m, _) in enumerate(LATER)])
def test_options_of_more_methods_are_byte_exact(method, options):
    if method not in METHODS:
        pytest.skip(f"{method} is not registered (load it with -p minilora.<module>)")
    cfg, config = CFGS["3x64"], METHODS[method].config_cls(**options)
    for ckpt in (False, True):
        got = measure(model_for(cfg, config), 3, 20, checkpoint=ckpt)
        assert estimate(method, cfg, 3, 20, config, checkpoint=ckpt).as_dict() == got.as_dict(), ckpt


@pytest.mark.parametrize("targets", [["c_attn"], "all-linear"])
def test_lora_fa_entry_equals_lora_with_A_frozen(targets):
    """LoRA-FA's entry (used once lora_fa is registered) against LoRA whose lora_A is frozen by hand."""
    cfg, config = CFGS["3x64"], LoRAConfig(targets=targets)
    for ckpt in (False, True):
        model = model_for(cfg, config)
        for n, p in model.named_parameters():
            p.requires_grad_(".lora_B." in n)
        got = measure(model, 3, 20, checkpoint=ckpt)
        assert estimate("lora_fa", cfg, 3, 20, config, checkpoint=ckpt).as_dict() == got.as_dict()


def test_lora_fa_keeps_less_than_lora_and_lora_plus_equals_lora():
    cfg, config = CFGS["3x64"], LoRAConfig(targets="all-linear")
    lora, fa = estimate("lora", cfg, 4, 32, config), estimate("lora_fa", cfg, 4, 32, config)
    B_T_C = 4 * 32 * 64 * 4
    # no x for A: ln_1's output (c_attn), ln_2's (c_fc), GELU's (mlp.c_proj: 4C); the attention output stays (SDPA's)
    assert lora.activations - fa.activations == cfg.n_layer * 6 * B_T_C
    assert fa.grads < lora.grads and fa.weights == lora.weights
    assert estimate("lora_plus", cfg, 4, 32, config) == lora


def test_longlora_s2_attn_term_is_the_grouped_math_path():
    """S²-Attn (longlora.py::_grouped_causal) runs SDPA's math path on (B, h, n, G, hs) groups: per half of the
    heads it keeps q·√scale, k·√scale, the padded v (B, h, n·G, hs) and the softmax (B, h, n, G, G), no log-sum-exp
    and no c_attn output; c_proj's LoRA keeps the attention output instead. T = 30 > G = 8 with G/2 = 4 front
    positions: 4 groups for heads 0, 1 and 5 for heads 2, 3 (the last padded)."""
    if "longlora" not in METHODS:
        pytest.skip("longlora is not registered")
    cfg, (B, T), Config = CFGS["3x64"], (3, 30), METHODS["longlora"].config_cls
    s2, full = (estimate("longlora", cfg, B, T, Config(s2_attn=on)) for on in (True, False))
    hs, G, a = 16, 8, 4
    grouped = sum(B * 2 * n * G * (3 * hs + G) * a for n in (4, 5))  # q, k, v and softmax of both halves
    sdpa = 3 * B * T * 64 * a + B * 4 * T * 4  # full attention: c_attn's (B, T, 3C) output, the log-sum-exp
    assert s2.activations - full.activations == cfg.n_layer * (grouped - sdpa)
    assert s2.detail["transformer.h.0.attn.s2_1.softmax"] == B * 2 * 5 * G * G * a


def test_longlora_odd_heads_long_sequences_and_bf16():
    """Odd head counts (1 + 2 heads), T beyond the base block_size (context_factor 2), G = 1; in bf16 the S²-Attn
    tensors stay fp32 (the math path upcasts), within the LayerNorm statistics' bf16 difference."""
    if "longlora" not in METHODS:
        pytest.skip("longlora is not registered")
    cfg, Config = GPTConfig(n_layer=2, n_head=3, n_embd=48, vocab_size=50, block_size=32), METHODS["longlora"].config_cls
    for B, T, config in [(2, 7, Config()), (1, 40, Config()), (2, 13, Config(group_size_ratio=0.05))]:
        for ckpt in (False, True):
            got = measure(model_for(cfg, config), B, T, checkpoint=ckpt)
            assert estimate("longlora", cfg, B, T, config, checkpoint=ckpt).as_dict() == got.as_dict(), (T, ckpt)
    got = measure(model_for(cfg, Config()).to(torch.bfloat16), 2, 24)
    est = estimate("longlora", cfg, 2, 24, weight_bytes=2)
    assert est.weights == got.weights and abs(est.activations - got.activations) <= 0.01 * got.activations


def test_gpt2_parameters_match_the_model():
    for cfg in [*CFGS.values(), GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=40, bias=False)]:
        assert gpt2_parameters(cfg) == {n: p.numel() for n, p in GPT(cfg).named_parameters()}


@pytest.mark.parametrize("shape", [(96, 32), (7, 9), (4096, 3)])
@pytest.mark.parametrize("block_size,dq", [(64, True), (64, False), (128, True)])
def test_nf4_bytes_match_the_stored_tensors(shape, block_size, dq):
    q = quantize_nf4(torch.randn(shape), block_size, dq)
    stored = sum(t.numel() * t.element_size() for t in (q.packed, q.absmax, q.absmax_scale, q.absmax_offset)
                 if t is not None)
    assert nf4_bytes(shape[0] * shape[1], block_size, dq) == stored


def test_trainable_counts_match_the_method_formulas():
    cfg = CFGS["3x64"]
    prefix, prompt = PrefixConfig(), PromptConfig(encoder="mlp")
    assert estimate("prefix", cfg, 2, 8, prefix).grads == 4 * prefix_param_count(prefix, 3, 64)
    assert estimate("prompt", cfg, 2, 8, prompt).grads == 4 * prompt_param_count(prompt, 64)


def test_checkpointing_keeps_block_inputs_and_recomputes_one_block():
    cfg, (B, T) = CFGS["3x64"], (3, 30)
    plain, ckpt = estimate("full", cfg, B, T), estimate("full", cfg, B, T, checkpoint=True)
    x = B * T * cfg.n_embd * 4
    assert ckpt.detail["kept: block inputs"] == cfg.n_layer * x
    block = 16 * x + 2 * 2 * B * T * 4 + B * cfg.n_head * T * 4  # 16 (B, T, C) tensors, LN stats, log-sum-exp
    assert ckpt.detail["recompute: largest block"] == block - x  # its input is kept already
    head = plain.activations - cfg.n_layer * block  # embeddings' indices, ln_f, head, loss
    assert ckpt.activations == max(cfg.n_layer * x + head, cfg.n_layer * x + block - x + 8 * B * T + 8 * T)
    assert ckpt.activations < plain.activations
    # lm_head-only LoRA: no block has a backward, so checkpointing keeps no block input at all
    head = estimate("lora", cfg, B, T, LoRAConfig(targets=["lm_head"]), checkpoint=True)
    assert head.detail["kept: block inputs"] == 0 == head.detail["recompute: largest block"]


def test_checkpointing_gives_the_same_gradients_and_leaves_the_gpt_plain():
    cfg = CFGS["2x32"]
    model = model_for(cfg, LoRAConfig(targets="all-linear")).train()
    blocks = list(model.transformer.h)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    grads = []
    for use in (False, True):
        model.zero_grad()
        with checkpointing(model) if use else contextlib.nullcontext():
            model(x, x)[1].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert list(model.transformer.h) == blocks  # the blocks are back, unwrapped


def test_unsupported_options_are_clear_errors():
    for method, config in [("lora", LoRAConfig(dropout=0.1)), ("dora", DoRAConfig(detach_norm=False)),
                           ("prompt", PromptConfig(encoder="lstm"))]:
        with pytest.raises(ValueError, match="minilora/memory.py"):
            estimate(method, CFGS["2x32"], 2, 8, config)
    with pytest.raises(ValueError, match="exceed block_size"):
        estimate("prompt", CFGS["2x32"], 2, 60)


def test_llama_shapes_and_the_published_figures():
    # parameter counts of the LLaMA paper's Table 2 (6.7B, 13.0B, 65.2B) and TinyLlama's 1.1B
    for key, billions in [("1.1B", 1.1), ("7B", 6.7), ("13B", 13.0), ("65B", 65.2)]:
        assert abs(LLAMA[key].params() / 1e9 - billions) < 0.05 * billions, key
    full, qlora = (llama_estimate(LLAMA["65B"], m) for m in ("full", "qlora"))
    assert full.total > 780e9  # QLoRA §1: more than 780 GB for 16-bit fine-tuning of LLaMA-65B
    assert qlora.total < 48e9  # QLoRA abstract: on a single 48 GB GPU
    assert {p[0] for p in PUBLISHED} <= set(LLAMA)


def test_plots_run():
    cfg = CFGS["2x32"]
    rows = {m: estimate(m, cfg, 4, 12) for m in NAMES}
    plot_breakdown(rows, title="test")
    plot_checkpointing({"full": [(8, 1), (16, 2)]}, {"full": [(8, 1)]})
    plot_projection({"7B": {m: llama_estimate(LLAMA["7B"], m) for m in ("full", "lora", "qlora")}})


PHASES = GPTConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=512, block_size=128)  # B, T = 8, 64: 1 MiB of logits


def check_phases(got, method, ckpt, kernels):
    """measure_cuda's counters against predict_cuda (anchored on the measured `before`, which holds the weights,
    the optimizer state and, on a GPU, cuBLAS's workspaces): the optimizer state and the bytes allocated at the end
    of each phase to the byte, each phase's peak within 5 % of max_memory_allocated."""
    est = estimate(method, PHASES, 8, 64, checkpoint=ckpt)
    want = predict_cuda(est, got["before"], kernels=kernels)
    assert got["optimizer_state"] == est.optimizer
    for k in ("after_forward", "after_backward", "after_step"):
        assert got[k] == want[k], (k, got[k] - got["before"], want[k] - want["before"])
    for phase in ("forward", "backward", "step"):
        peak = got[f"{phase}_peak"]
        assert peak >= got[f"after_{phase}"] and abs(want[f"{phase}_peak"] - peak) <= 0.05 * peak, (phase, got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_cuda_phases_match_the_estimate(method, ckpt):
    """fp32 on the GPU (no autocast). On an H200 (torch 2.11+cu130, 2026-12-04) every end of phase that the run
    printed, less the 1 MiB of logits the loop then kept, was predict_cuda's to the byte."""
    got = measure_cuda(model_for(PHASES, METHODS[method].config_cls()), 8, 64, checkpoint=ckpt)
    check_phases(got, method, ckpt, "cuda")


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_cuda_phases_match_the_estimate_on_a_cpu_stand_in(method, ckpt, monkeypatch):
    """measure_cuda's own code on the CPU: torch.cuda's counters are a LiveBytes's, which counts the live storages
    as CUDA's allocator counts its blocks (a caller's 1 MiB of logits kept through backward fails here)."""
    model = model_for(PHASES, METHODS[method].config_cls())
    with LiveBytes(model) as meter:
        for name in ("synchronize", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats",
                     "get_device_name"):
            monkeypatch.setattr(torch.cuda, name, getattr(meter, name))
        got = measure_cuda(model, 8, 64, checkpoint=ckpt, device="cpu")
    assert got["device"] == meter.get_device_name()
    check_phases(got, method, ckpt, "cpu")


@pytest.mark.parametrize("ckpt", [False, True])
def test_keeping_the_logits_costs_B_T_V_a_through_backward_and_step(ckpt):
    """train.py's `_, loss = model(x, y)` keeps the logits to the end of the step: predict_cuda's "logits"."""
    got = []
    for keep in (False, True):
        model = model_for(PHASES, METHODS["lora"].config_cls())
        with LiveBytes(model) as meter:
            got.append(measure_device(model, 8, 64, "cpu", meter, checkpoint=ckpt, keep_logits=keep))
    logits = predict_cuda(estimate("lora", PHASES, 8, 64, checkpoint=ckpt))["logits"]
    assert logits == 8 * 64 * 512 * 4
    for k in ("after_forward", "backward_peak", "after_backward", "step_peak", "after_step"):
        assert got[1][k] - got[0][k] == logits, k
    assert got[1]["forward_peak"] == got[0]["forward_peak"]  # the loss is computed from them either way


def test_live_bytes_counts_what_only_autograd_holds_in_512_byte_blocks():
    with LiveBytes() as meter:
        start = meter.memory_allocated()
        w = torch.randn(10, requires_grad=True)  # 40 bytes: one 512-byte block
        y = w.exp().sum()  # exp keeps its output for backward; no Python name holds it
        assert meter.memory_allocated() - start == 3 * 512  # w, exp(w), y
        y.backward()  # frees exp(w), makes w.grad
        del y
        assert meter.memory_allocated() - start == 2 * 512  # w, w.grad
        meter.reset_peak_memory_stats()
        torch.zeros(1000)  # 4,000 bytes, freed at once
        assert meter.memory_allocated() - start == 2 * 512 and meter.max_memory_allocated() - start == 2 * 512 + 4096


def test_predict_cuda_needs_an_estimate():
    with pytest.raises(ValueError, match="estimate"):
        predict_cuda(llama_estimate(LLAMA["1.1B"], "lora"))
