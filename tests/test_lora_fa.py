"""LoRA-FA (minilora/lora_fa.py): the properties its docstring claims. What autograd keeps is measured with
train.SavedTensorMeter and compared, to the byte, with the prediction (the adapted layers' inputs); the projected
gradient is checked against a least-squares oracle and against PEFT's LoraFAOptimizer (skipped without peft)."""
import copy
import dataclasses
import json

import pytest
import torch

from minilora import GPT, PRESETS, GPTConfig, LoRAConfig, attach, load_adapter, merge, save_adapter, unmerge
from minilora.attach import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from minilora.checkpoint import load_safetensors
from minilora.lora import LoRALinear
from minilora.lora_fa import LoRAFAConfig, LoRAFALinear, ProjectGradient
from minilora.train import CorpusData, SavedTensorMeter, TrainConfig, train

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)
CONFIGS = {"c_attn": LoRAFAConfig(), "all-linear": LoRAFAConfig(targets="all-linear", r=4),
           "fused_qv": LoRAFAConfig(fused_qkv=["q", "v"])}


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def with_fa(config, seed=0):
    base = tiny(seed)
    return base, attach(copy.deepcopy(base), config)


def as_lora(config):
    """The same fields in a plain LoRAConfig: LoRA at equal r, targets, ..."""
    return LoRAConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(LoRAConfig)})


def tokens(B=3, T=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def fa_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRAFALinear)]


def steps(model, n=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(n):
        x = tokens(seed=i)
        model(x, torch.roll(x, -1, 1))[1].backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# ------------------------------------------------------------------------ what trains
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_identity_at_init(case):
    base, model = with_fa(CONFIGS[case])
    assert torch.equal(logits(model, tokens()), logits(base, tokens()))  # B = 0: exactly the base


def test_only_B_trains_and_A_never_changes():
    _, model = with_fa(LoRAFAConfig(targets="all-linear"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_B.default." in n for n in trainable)
    A0 = [m.lora_A["default"].weight.clone() for m in fa_modules(model)]
    B0 = [m.lora_B["default"].weight.clone() for m in fa_modules(model)]
    steps(model)
    for m, a, b in zip(fa_modules(model), A0, B0):
        assert torch.equal(m.lora_A["default"].weight, a) and m.lora_A["default"].weight.grad is None
        assert not torch.equal(m.lora_B["default"].weight, b)


def test_trainable_count_on_tiny_preset():
    """r·d_out per adapted linear: LoRA's r·(d_in + d_out) without A. tiny: 4 blocks of c_attn (128 -> 384)."""
    model = attach(GPT(PRESETS["tiny"]), LoRAFAConfig())
    assert model.num_params(trainable_only=True) == 4 * 8 * 384 == 12_288  # LoRA: 16,384


def test_embedding_is_refused():
    with pytest.raises(ValueError, match="embedding"):
        LoRAFAConfig(embedding=True)


def test_merge_is_exact():
    base, model = with_fa(LoRAFAConfig(targets="all-linear"))
    steps(model)
    before = logits(model, tokens())
    merge(model)
    merge(model)  # idempotent
    torch.testing.assert_close(logits(model, tokens()), before, atol=1e-5, rtol=0)
    unmerge(model)
    for n, m in model.named_modules():
        if isinstance(m, LoRAFALinear):
            torch.testing.assert_close(m.base_layer.weight, base.get_submodule(n).weight, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------ A from the seed, B in the file
def test_A_is_regenerated_from_the_seed():
    """A is Kaiming-uniform(a=√5) from Generator(seed), in module order, whatever the global RNG state."""
    _, one = with_fa(LoRAFAConfig(targets="all-linear"), seed=0)
    _, two = with_fa(LoRAFAConfig(targets="all-linear"), seed=5)  # another global RNG state (and base)
    _, other = with_fa(LoRAFAConfig(targets="all-linear", seed=1))
    g = torch.Generator().manual_seed(0)
    for a, b, c in zip(fa_modules(one), fa_modules(two), fa_modules(other)):
        A = a.lora_A["default"].weight
        oracle = torch.nn.init.kaiming_uniform_(torch.empty(A.shape), a=5 ** 0.5, generator=g)
        assert torch.equal(A, oracle) and torch.equal(A, b.lora_A["default"].weight)
        assert not torch.equal(A, c.lora_A["default"].weight)
        assert A.abs().max() <= A.size(1) ** -0.5  # the bound 1/√d_in of LoRA's init


def test_adapter_file_holds_B_only_and_the_seed_regenerates_A(tmp_path):
    _, model = with_fa(LoRAFAConfig(targets="all-linear", seed=7))
    steps(model)
    save_adapter(model, tmp_path)
    state = load_safetensors(tmp_path / ADAPTER_WEIGHTS)
    assert state and all(".lora_B." in k for k in state)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["minilora_config"]["seed"] == 7 and "peft_type" not in raw  # not offered to PEFT (it would need A)
    fresh = load_adapter(tiny(), tmp_path)
    assert torch.equal(logits(fresh, tokens()), logits(model, tokens()))
    raw["minilora_config"]["seed"] = 8  # another A: the file's B then means something else
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(raw))
    assert not torch.allclose(logits(load_adapter(tiny(), tmp_path), tokens()), logits(model, tokens()))


# ------------------------------------------------------------------------ memory: what autograd keeps
def test_branch_keeps_a_not_x():
    """One adapted layer, x (N, d_in) needing a gradient: besides weights, LoRA keeps x and a = A x, LoRA-FA a only."""
    _, model = with_fa(LoRAFAConfig())
    m = model.transformer.h[1].attn.c_attn
    x = torch.randn(5, 7, 32, requires_grad=True)  # (B, T, d_in)
    kept = {}
    for frozen in (True, False):
        m.lora_A["default"].weight.requires_grad_(not frozen)  # False: a LoRA layer
        meter = SavedTensorMeter(model)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            m(x)
        kept[frozen] = meter
    assert kept[True].bytes == 5 * 7 * 8 * 4  # a (B, T, r), fp32
    assert kept[False].bytes == 5 * 7 * (32 + 8) * 4 and x.untyped_storage().data_ptr() in kept[False].storages


def saved(model, idx):
    """(bytes autograd keeps for backward, parameters excluded; the storages it keeps; {storage: bytes} of the
    adapted layers' inputs) for one training forward. The inputs are held until the end, so that no storage of
    theirs is freed and reused by another tensor during the forward."""
    meter, inputs = SavedTensorMeter(model), []
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
             for m in model.modules() if isinstance(m, LoRALinear)]
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        model(idx, torch.roll(idx, -1, 1))
    for h in hooks:
        h.remove()
    return meter.bytes, set(meter.storages), {x.untyped_storage().data_ptr(): x.numel() * x.element_size() for x in inputs}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_saved_activations_drop_by_exactly_the_layer_inputs(case):
    """The drop from LoRA to LoRA-FA is the adapted layers' inputs x (B, T, d_in), fp32, less those the rest of
    the model keeps anyway: attn.c_proj's input is the attention output, which the attention kernel keeps for its
    own backward. c_attn's input (ln_1's output), c_fc's (ln_2's) and mlp.c_proj's (GELU's output) only LoRA keeps."""
    idx = tokens(B=4, T=12)
    _, fa = with_fa(CONFIGS[case])
    _, lo = with_fa(as_lora(CONFIGS[case]))
    fa_bytes, fa_kept, fa_inputs = saved(fa, idx)
    lora_bytes, lora_kept, lora_inputs = saved(lo, idx)
    already = {n for n, m in fa.named_modules() if isinstance(m, LoRAFALinear) and n.endswith("attn.c_proj")}
    predicted = sum(4 * 12 * fa.get_submodule(n).base_layer.in_features * 4
                    for n, m in fa.named_modules() if isinstance(m, LoRAFALinear) and n not in already)
    if case == "fused_qv":  # B assembled into (3C, g·r) (lora._block) is a new tensor, kept where ∂L/∂a is needed:
        predicted += 96 * 16 * 4  # by LoRA in every block, by LoRA-FA not in block 0, whose input needs no gradient
    assert lora_bytes - fa_bytes == predicted
    assert set(lora_inputs) <= lora_kept  # LoRA keeps every adapted layer's input ...
    assert sum(b for s, b in fa_inputs.items() if s in fa_kept) == 4 * 12 * 32 * 4 * len(already)  # LoRA-FA: c_proj's


# ------------------------------------------------------------------------ the projected gradient (project_grad)
@pytest.mark.parametrize("case", ["c_attn", "fused_qv"])
def test_projected_gradient_is_the_least_squares_fit_of_the_full_gradient(case):
    """For loss = Σ g ⊙ h, G = ∂L/∂W = gᵀ x. After project_grad, s·∂L/∂B_j solves min_X ‖X A_j − G_j‖ (G_j: the
    rows that pair j writes), i.e. ΔW = s·(∂L/∂B) A is the best fit of G in the row space of A."""
    _, model = with_fa(CONFIGS[case])
    m = model.transformer.h[1].attn.c_attn
    x, g = torch.randn(20, 32), torch.randn(20, 96)  # 20 tokens, d_in 32, d_out 96
    (m(x) * g).sum().backward()
    m.project_grad("default")
    B, A = m.params("default")
    G, s = g.T @ x, m.scaling["default"]  # (96, 20) @ (20, 32) -> (d_out, d_in)
    parts = m.parts["default"] or [None]
    r, C = A.size(0) // len(parts), B.size(0) // len(parts)
    for j, part in enumerate(parts):
        rows = G if part is None else G[part * 32:(part + 1) * 32]
        A_j = A[j * r:(j + 1) * r]  # (r, d_in)
        best = torch.linalg.lstsq(A_j.T.double(), rows.T.double()).solution.T  # (C, r): argmin ‖X A_j − G_j‖
        torch.testing.assert_close(s * B.grad[j * C:(j + 1) * C].double(), best, rtol=0, atol=1e-5 * best.abs().max())


def test_projected_gradient_equals_peft_lorafa_optimizer(monkeypatch):
    """Three AdamW steps with our ProjectGradient + torch.optim.AdamW and with PEFT's LoraFAOptimizer (same betas,
    eps = 0, no decay, on a deep copy of the same model and batches) give the same B. Adam cancels the constant
    1/s², which the least-squares test above checks; this one checks the (AAᵀ)⁻¹ and the pairing of A with B."""
    lorafa = pytest.importorskip("peft.optimizers.lorafa", reason="peft not installed: no LoRA-FA parity")
    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)  # else PEFT projects under bf16 autocast
    _, ours = with_fa(LoRAFAConfig(r=4, alpha=8, targets="all-linear"))
    theirs = copy.deepcopy(ours)
    named = list(theirs.named_parameters())
    scaling = [theirs.get_submodule(n.rpartition(".lora_")[0]).scaling["default"] if ".lora_" in n else None
               for n, _ in named]  # PEFT's create_lorafa_optimizer's per-parameter scaling factors
    opt_theirs = lorafa.LoraFAOptimizer([{"params": [p for _, p in named], "names": [n for n, _ in named],
                                          "scaling_factors": scaling, "lr": 1e-2, "betas": (0.9, 0.999),
                                          "eps": 0.0, "weight_decay": 0.0}])
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.999),
                                 eps=0.0, weight_decay=0.0)
    project = ProjectGradient(ours)
    for i in range(3):
        x = tokens(seed=i)
        for model in (ours, theirs):
            model.train()(x, torch.roll(x, -1, 1))[1].backward()
        project.on_before_optimizer_step(None)
        opt_ours.step(), opt_theirs.step()
        opt_ours.zero_grad(), opt_theirs.zero_grad()
    for a, b in zip(fa_modules(ours), fa_modules(theirs)):
        torch.testing.assert_close(a.lora_B["default"].weight, b.lora_B["default"].weight, atol=1e-6, rtol=0)
        assert a.lora_B["default"].weight.abs().max() > 1e-3  # B moved


def test_project_grad_is_a_training_callback():
    assert LoRAFAConfig().callbacks(None) == []
    data = CorpusData(torch.randint(0, 64, (400,)), torch.randint(0, 64, (200,)), block_size=16)
    cfg = TrainConfig(steps=2, batch_size=2, eval_every=2, eval_examples=2, warmup_steps=0, progress=False)
    B = {}
    for flag in (False, True):
        _, model = with_fa(LoRAFAConfig(project_grad=flag))
        assert [type(c) for c in model.minilora_config.callbacks(model)] == [ProjectGradient] * flag
        train(model, data, cfg)
        B[flag] = model.transformer.h[0].attn.c_attn.lora_B["default"].weight.detach().clone()
    assert not torch.allclose(B[False], B[True])
