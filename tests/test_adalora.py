"""AdaLoRA (minilora/adalora.py): the budget formula, the importance math against hand computations,
global top-k masking, the schedule running inside train(), the shrink, rank_pattern files (rank 0
included), the orthogonality regularizer, and PEFT loading our shrunk adapter (skipped without peft)."""
import copy
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from minilora import GPT, GPTConfig, PRESETS, attach, load_adapter, save_adapter
from minilora.adalora import (AdaLoRAConfig, SVDLinear, mask_to_budget, orth_regularizer, plot_budget,
                              plot_rank_heatmap, rank_budget, shrink, triplet_scores, update_importance)
from minilora.attach import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from minilora.checkpoint import load_safetensors
from minilora.data import Example, Task
from minilora.train import TrainConfig, TrainState, train

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)
LESSON = Path(__file__).resolve().parent.parent / "lessons" / "07-adalora.md"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster than several fighting other processes for 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def with_adalora(config=None, seed=0):
    base = tiny(seed)
    return base, attach(copy.deepcopy(base), config or AdaLoRAConfig(init_r=4, target_r=2))


def tokens(B=3, T=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, idx):
    with torch.no_grad():
        return model.eval()(idx)[0]


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, SVDLinear)}


def randomize(model, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if re.search(r"\.lora_[AEB]$", n):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def toy_task(n=256):
    """Answer = the prompt's last token + 1 (mod 60)."""
    g = torch.Generator().manual_seed(0)
    def ex():
        p = torch.randint(0, 60, (6,), generator=g).tolist()
        return Example(prompt=p, answer=[(p[-1] + 1) % 60, 63])
    return Task("toy", "last token + 1", "exact match", [ex() for _ in range(n)],
                [ex() for _ in range(16)], [ex() for _ in range(16)])


# ------------------------------------------------------------------------ the budget schedule
def test_rank_budget_boundaries_and_cubic_midpoint():
    s = dict(total_steps=100, init_budget=96, target_budget=64, tinit=10, tfinal=30)
    assert rank_budget(0, **s) == rank_budget(10, **s) == 96  # b(0) through tinit
    assert rank_budget(40, **s) == 64 + 32 * (1 - 30 / 60) ** 3 == 68  # midpoint of 10..70: 1/8 of the gap
    assert rank_budget(25, **s) == int(64 + 32 * (1 - 15 / 60) ** 3) == 77  # rounded down
    assert rank_budget(70, **s) == rank_budget(71, **s) == rank_budget(100, **s) == 64  # b(T) from T - tfinal
    values = [rank_budget(t, **s) for t in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


LESSON_TABLE = {0: 192, 30: 192, 60: 165, 90: 146, 120: 136, 150: 130, 180: 128, 210: 128, 300: 128}


def test_lesson_budget_table():
    # the default config on the tiny preset (4 blocks × 4 matrices, init_r 12, target_r 8) for 300 steps:
    # tinit = 300 // 10 = 30, tfinal = 3 · 300 // 10 = 90
    n = 4 * 4
    s = dict(total_steps=300, init_budget=12 * n, target_budget=8 * n, tinit=30, tfinal=90)
    assert {t: rank_budget(t, **s) for t in LESSON_TABLE} == LESSON_TABLE
    text = LESSON.read_text(encoding="utf-8")
    for t, b in LESSON_TABLE.items():
        assert re.search(rf"^\| {t} \| {b} \|", text, re.M), f"lessons/07-adalora.md lacks the row t={t}, b={b}"


def test_parameter_counts_on_tiny():
    # lessons/07-adalora.md: a triplet costs d_out + 1 + d_in; 2,052 per block per unit of rank on tiny
    model = attach(GPT(PRESETS["tiny"]), AdaLoRAConfig())
    assert model.num_params(trainable_only=True) == 4 * 12 * 2052 == 98_496
    eight = {n: 8 for n in layers(model)}
    assert attach(GPT(PRESETS["tiny"]), AdaLoRAConfig(rank_pattern=eight)).num_params(trainable_only=True) == 65_664


# ------------------------------------------------------------------------ importance and masking
def test_importance_ema_on_a_hand_made_example():
    I_bar, U_bar = torch.zeros(2), torch.zeros(2)
    I_bar, U_bar = update_importance(I_bar, U_bar, torch.tensor([1.0, 0.0]), 0.5, 0.5)
    assert torch.equal(I_bar, torch.tensor([0.5, 0.0])) and torch.equal(U_bar, torch.tensor([0.25, 0.0]))
    I_bar, U_bar = update_importance(I_bar, U_bar, torch.tensor([3.0, 2.0]), 0.5, 0.5)
    # Ī = 0.5·0.5 + 0.5·3 = 1.75; Ū = 0.5·0.25 + 0.5·|3 − 1.75| = 0.75; second entry: Ī = 1, Ū = 0.5
    assert torch.equal(I_bar, torch.tensor([1.75, 1.0])) and torch.equal(U_bar, torch.tensor([0.75, 0.5]))
    # S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)
    s_A = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 6.0]])  # Q (r=2, d_in=3): row means 2, 2
    s_E = torch.tensor([10.0, 20.0])
    s_B = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # P (d_out=2, r=2): column means 2, 2
    assert torch.equal(triplet_scores(s_A, s_E, s_B), torch.tensor([14.0, 24.0]))


def test_allocator_sensitivity_is_weight_times_gradient():
    _, model = with_adalora(AdaLoRAConfig(init_r=2, target_r=1, beta1=0.5, beta2=0.5, orth_reg_weight=0))
    randomize(model)
    alloc = model.rank_allocator
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.0), TrainConfig(steps=100), step=1)
    alloc.on_train_start(state)
    x = tokens()
    model.train()(x, torch.roll(x, -1, 1))[1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    alloc.on_before_optimizer_step(state)
    alloc.on_step_end(state)  # lr 0: the weights after the step are the weights before it
    for n, p in model.named_parameters():
        if p.requires_grad:
            I = (p.detach() * grads[n]).abs()
            torch.testing.assert_close(alloc.ema[n][0], 0.5 * I)  # Ī = (1 − β1) I
            torch.testing.assert_close(alloc.ema[n][1], 0.25 * I)  # Ū = (1 − β2) |I − Ī|


def test_topk_masking_keeps_exactly_the_budget_globally():
    scores = {"a": torch.tensor([5.0, 1.0, 1.0]), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor([9.0, 7.0, 0.0])}
    for budget in range(9):
        keep = mask_to_budget(scores, budget)
        assert sum(int(k.sum()) for k in keep.values()) == budget  # ties (the four 1.0s) do not undercut it
    keep = mask_to_budget(scores, 3)
    assert keep["a"].tolist() == [True, False, False] and not keep["b"].any()
    assert keep["c"].tolist() == [True, True, False]


# ------------------------------------------------------------------------ the regularizer
def test_orth_regularizer_value_and_its_gradient_reaches_the_step():
    _, model = with_adalora(AdaLoRAConfig(init_r=2, target_r=1, targets=["c_fc"], layers=[0], orth_reg_weight=0.5))
    m = layers(model)["transformer.h.0.mlp.c_fc"]
    with torch.no_grad():
        m.lora_B.zero_()
        m.lora_B[0, 0], m.lora_B[1, 1] = 1.0, 2.0  # PᵀP = diag(1, 4): ‖PᵀP − I‖² = 9
        m.lora_A.zero_()  # QQᵀ = 0: ‖0 − I‖² = 2
    assert orth_regularizer(model).item() == 11.0
    randomize(model)
    state = TrainState(model, None, TrainConfig(steps=10))
    model.rank_allocator.on_train_start(state)
    model.rank_allocator.on_before_optimizer_step(state)  # with zero task gradients: grad = γ ∂R
    P, Q, eye = m.lora_B.detach(), m.lora_A.detach(), torch.eye(2)
    torch.testing.assert_close(m.lora_B.grad, 0.5 * 4 * P @ (P.T @ P - eye))
    torch.testing.assert_close(m.lora_A.grad, 0.5 * 4 * (Q @ Q.T - eye) @ Q)
    assert m.lora_E.grad is None  # R does not involve λ


def test_regularizer_makes_p_and_q_more_orthonormal_in_train():
    R = {}
    for gamma in (0.0, 0.5):
        _, model = with_adalora(AdaLoRAConfig(init_r=4, target_r=2, orth_reg_weight=gamma))
        train(model, toy_task(), TrainConfig(steps=30, batch_size=8, lr=1e-2, eval_every=30, progress=False))
        R[gamma] = orth_regularizer(model).item()
    assert R[0.5] < 0.5 * R[0.0]


# ------------------------------------------------------------------------ the schedule inside train()
class Snapshot:
    """A user callback: λ of every module right after `step`."""
    def __init__(self, step):
        self.step, self.value = step, None
    def on_train_start(self, state): ...
    def on_before_optimizer_step(self, state): ...
    def on_eval(self, state, metrics): ...
    def on_train_end(self, state): ...
    def on_step_end(self, state):
        if state.step == self.step:
            self.value = {n: m.lora_E.detach().clone() for n, m in layers(state.model).items()}


def test_callback_runs_inside_train_total_rank_follows_schedule_then_shrinks():
    config = AdaLoRAConfig(init_r=4, target_r=2, tinit=3, tfinal=6, deltaT=4)
    _, model = with_adalora(config)
    n_before = model.num_params(trainable_only=True)
    snap = Snapshot(14)  # T − tfinal = 20 − 6: the shrink step
    record = train(model, toy_task(), TrainConfig(steps=20, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=5,
                                                  progress=False), callbacks=[snap])
    hist, sched = model.rank_allocator.history, model.rank_allocator.schedule
    assert sched == dict(total_steps=20, init_budget=32, target_budget=16, tinit=3, tfinal=6)
    masked_at = [t for t in range(1, 21) if (3 < t < 14 and t % 4 == 0) or t == 14]  # 4, 8, 12, 14
    for t in range(21):
        last = max([s for s in masked_at if s <= t], default=None)
        expected = 32 if last is None else rank_budget(last, **sched)
        assert sum(hist[t].values()) == expected, t
    assert sum(hist[14].values()) == 16 and hist[20] == hist[14] == config.rank_pattern
    # the shrink is physical: parameter shapes, the count train() reports, the saved adapter
    for n, m in layers(model).items():
        r = config.rank_pattern[n]
        assert m.lora_A.shape == (r, m.base_layer.in_features) and m.lora_B.shape == (m.base_layer.out_features, r)
    assert record["trainable_params"] == model.num_params(trainable_only=True) < n_before
    # and training went on after it, with keep_best restoring a post-shrink state
    changed = [not torch.equal(snap.value[n][snap.value[n] != 0], m.lora_E.detach()) for n, m in layers(model).items()
               if m.r]
    assert any(changed)


def test_a_step_after_the_shrink_equals_the_masked_step():
    _, model = with_adalora(AdaLoRAConfig(init_r=4, target_r=2, orth_reg_weight=0))
    randomize(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x = tokens()
    for _ in range(2):  # some Adam state
        model.train()(x, torch.roll(x, -1, 1))[1].backward()
        opt.step(), opt.zero_grad()
    g = torch.Generator().manual_seed(0)
    keep = mask_to_budget({n: torch.randn(4, generator=g) for n in layers(model)}, 9)  # 9 of 32 triplets
    with torch.no_grad():
        for n, m in layers(model).items():
            m.lora_E.masked_fill_(~keep[n], 0.0)
    masked = copy.deepcopy(model)  # the same model and Adam state, pruned by the mask only
    opt_m = torch.optim.AdamW(masked.parameters(), lr=1e-2, weight_decay=0.1)
    opt_m.load_state_dict(copy.deepcopy(opt.state_dict()))  # not shared: AdamW updates its moments in place
    shrink(model, keep, opt)
    assert sum(m.r for m in layers(model).values()) == 9
    torch.testing.assert_close(logits(model, x), logits(masked, x), atol=1e-5, rtol=0)  # r 4 vs r 3 sums: rounding
    for m_, o in ((model, opt), (masked, opt_m)):
        m_.train()(x, torch.roll(x, -1, 1))[1].backward()
        o.step(), o.zero_grad()
    with torch.no_grad():
        for n, m in layers(masked).items():
            m.lora_E.masked_fill_(~keep[n], 0.0)  # the mask is re-applied after a masked step
    for n, m in layers(model).items():
        k, mm = keep[n], layers(masked)[n]
        torch.testing.assert_close(m.lora_E, mm.lora_E[k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m.lora_A, mm.lora_A[k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(m.lora_B, mm.lora_B[:, k], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(model, x), logits(masked, x), atol=1e-5, rtol=0)  # float rounding only


# ------------------------------------------------------------------------ files
def shrunk_with_a_rank_0_module(seed=0):
    base, model = with_adalora(AdaLoRAConfig(init_r=4, target_r=2), seed)
    randomize(model)
    keep = {n: torch.tensor([True, False, True, True]) for n in layers(model)}
    keep["transformer.h.0.attn.c_proj"] = torch.zeros(4, dtype=torch.bool)  # this matrix lost every triplet
    shrink(model, keep)
    return base, model


def test_rank_pattern_save_load_including_rank_0(tmp_path):
    base, model = shrunk_with_a_rank_0_module()
    zero = layers(model)["transformer.h.0.attn.c_proj"]
    assert zero.r == 0 and torch.equal(zero.delta_weight(), torch.zeros(32, 32))
    x = tokens()
    assert torch.equal(zero(torch.ones(2, 32)), zero.base_layer(torch.ones(2, 32)))  # rank 0: zero update
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["minilora_config"]["rank_pattern"]["transformer.h.0.attn.c_proj"] == 0
    assert raw["rank_pattern"]["transformer.h.0.mlp.c_fc.lora_E"] == [True, True, True, False]  # PEFT's form
    state = load_safetensors(tmp_path / ADAPTER_WEIGHTS)
    assert state["base_model.model.transformer.h.1.mlp.c_fc.lora_E"].shape == (3, 1)
    assert sum(t.numel() for t in state.values()) == model.num_params(trainable_only=True)
    fresh = load_adapter(copy.deepcopy(base), tmp_path)
    assert {n: m.r for n, m in layers(fresh).items()} == model.minilora_config.rank_pattern
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert not torch.allclose(logits(fresh, x), logits(base, x))
    fresh.rank_allocator.on_train_start(TrainState(fresh, None, TrainConfig(steps=10)))
    assert fresh.rank_allocator.done  # a loaded, shrunk adapter trains on with its ranks


def test_merge_is_idempotent_and_exact():
    from minilora import merge, unmerge
    base, model = shrunk_with_a_rank_0_module()
    x, before = tokens(), logits(model, tokens())
    merge(model), merge(model)  # the second call does nothing
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    unmerge(model), unmerge(model)
    torch.testing.assert_close(logits(model, x), before, atol=1e-5, rtol=0)
    for n, m in layers(model).items():
        torch.testing.assert_close(m.base_layer.weight, base.get_submodule(n).weight, atol=1e-6, rtol=0)


def test_config_json_round_trip_and_peft_form():
    config = AdaLoRAConfig(init_r=6, target_r=3, tinit=5, rank_pattern={"transformer.h.0.attn.c_attn": 2})
    raw = config.to_json()
    assert AdaLoRAConfig.from_json(raw) == config
    assert raw["peft_type"] == "ADALORA" and raw["init_r"] == 6 and raw["total_step"] == 6
    peft_style = {k: v for k, v in raw.items() if k not in ("minilora_config", "minilora_method")}
    back = AdaLoRAConfig.from_json(peft_style)
    assert back.rank_pattern == {"transformer.h.0.attn.c_attn": 2} and back.init_r == 6 and back.lora_alpha == 24
    with pytest.raises(ValueError, match="target_r"):
        AdaLoRAConfig(init_r=4, target_r=8)


def test_plots_draw(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    history = {0: {"transformer.h.0.attn.c_attn": 4, "transformer.h.1.mlp.c_fc": 4},
               5: {"transformer.h.0.attn.c_attn": 1, "transformer.h.1.mlp.c_fc": 3}}
    plot_rank_heatmap(history).savefig(tmp_path / "heat.png")
    sched = dict(total_steps=5, init_budget=8, target_budget=4, tinit=1, tfinal=1)
    plot_budget(history, sched).savefig(tmp_path / "budget.png")


# ------------------------------------------------------------------------ PEFT loads our shrunk adapter
def test_shrunk_adapter_loads_in_peft(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="transformers not installed: no PEFT parity")
    peft = pytest.importorskip("peft", reason="peft not installed: no PEFT parity")
    transformers.utils.logging.disable_progress_bar()
    base, model = shrunk_with_a_rank_0_module(seed=3)
    base.save_pretrained(tmp_path / "base", hf=True)
    save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about minilora's extra config keys, then ignores them
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits, logits(model, x), atol=1e-5, rtol=0)
