"""The training loop: schedule, determinism, callbacks, best checkpoint, the metrics record."""
import math

import pytest
import torch

from minilora import GPT, GPTConfig, FullConfig, attach
from minilora.attach import ADAPTER_WEIGHTS
from minilora.data import Example, Task
from minilora.train import Callback, CorpusData, TrainConfig, lr_factor, tensor_memory, train

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)


def toy_task(n=512):
    """Answer = the prompt's last token + 1 (mod 60): learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(0)
    def ex():
        p = torch.randint(0, 60, (6,), generator=g).tolist()
        return Example(prompt=p, answer=[(p[-1] + 1) % 60, 63])
    return Task("toy", "last token + 1", "exact match", [ex() for _ in range(n)],
                [ex() for _ in range(32)], [ex() for _ in range(32)])


def model(seed=0):
    torch.manual_seed(seed)
    return attach(GPT(CFG), FullConfig())


def quiet(**kw):
    return TrainConfig(progress=False, **kw)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(5, cfg) == pytest.approx(0.5)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert lr_factor(100, cfg) == pytest.approx(0.1)
    factors = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # decays monotonically


def test_training_lowers_loss_and_learns_the_task():
    m = model()
    task = toy_task()
    record = train(m, task, quiet(steps=80, batch_size=32, lr=1e-2, warmup_steps=5, eval_every=20))
    first, last = record["history"][0], record["history"][-1]
    assert last["loss"] < first["loss"] < math.log(64) + 0.5
    assert record["test"]["accuracy"] > 0.5


def test_same_seed_same_weights_on_cpu():
    task = toy_task()
    a, b = model(), model()
    train(a, task, quiet(steps=5, batch_size=8, seed=3))
    train(b, task, quiet(steps=5, batch_size=8, seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_callbacks_see_every_step_and_eval():
    seen = {"start": 0, "step": [], "eval": [], "end": 0}

    class Spy(Callback):
        def on_train_start(self, state): seen["start"] += 1
        def on_step_end(self, state): seen["step"].append(state.step)
        def on_eval(self, state, metrics): seen["eval"].append((state.step, metrics["loss"]))
        def on_train_end(self, state): seen["end"] += 1

    train(model(), toy_task(), quiet(steps=6, batch_size=4, eval_every=3), callbacks=[Spy()])
    assert seen["start"] == 1 and seen["end"] == 1 and seen["step"] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in seen["eval"]] == [3, 6]


def test_method_callbacks_and_optimizer_hooks_are_used():
    calls = []

    class Hooked(FullConfig):
        def callbacks(self, model):
            class C(Callback):
                def on_step_end(self, state): calls.append(state.step)
            return [C()]

        def optimizer(self, model, lr, weight_decay):
            return torch.optim.SGD(model.parameters(), lr=lr)

    from minilora.attach import METHODS, register
    register("hooked-test", Hooked, lr=0.1)(lambda model, config: None)
    try:
        torch.manual_seed(0)
        m = attach(GPT(CFG), Hooked())
        state_probe = {}

        class Probe(Callback):
            def on_train_start(self, state): state_probe["opt"] = type(state.optimizer).__name__
        train(m, toy_task(), quiet(steps=2, batch_size=4), callbacks=[Probe()])
        assert calls == [1, 2] and state_probe["opt"] == "SGD"
    finally:
        METHODS.pop("hooked-test")


def test_gradient_accumulation_matches_one_big_batch():
    # the loop averages micro-batch losses: with equal-sized micro-batches of the same sequences,
    # accumulating two halves gives the gradient of the whole batch
    m = model()
    x = torch.randint(0, 64, (8, 10))
    m(x, x)[1].backward()
    full = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    for half in (x[:4], x[4:]):
        (m(half, half)[1] / 2).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(full, m.parameters()))


def test_best_weights_restored_and_saved(tmp_path):
    m = model()
    record = train(m, toy_task(), quiet(steps=20, batch_size=8, eval_every=5, out_dir=str(tmp_path)))
    best = min(h["loss"] for h in record["history"])
    assert record["val"]["loss"] == pytest.approx(best, rel=1e-5)
    assert (tmp_path / ADAPTER_WEIGHTS).is_file()


def test_metrics_record_fields():
    m = model()
    r = train(m, toy_task(), quiet(steps=2, batch_size=4))
    assert r["trainable_params"] == r["total_params"] == m.num_params()
    assert r["trainable_pct"] == pytest.approx(100.0)
    assert set(r["memory_mb"]) == {"weights", "grads", "optimizer", "activations"}
    # fp32 AdamW: grads = weights, optimizer = 2 x weights
    mem = r["memory_mb"]
    assert mem["grads"] == pytest.approx(mem["weights"], rel=0.01)
    assert mem["optimizer"] == pytest.approx(2 * mem["weights"], rel=0.01)
    assert mem["activations"] > 0 and r["tokens_per_s"] > 0 and r["s_per_step"] > 0
    assert 0.0 <= r["test"]["accuracy"] <= 1.0


def test_tensor_memory_counts_tied_weights_once():
    m = model()
    opt = torch.optim.AdamW(m.parameters())
    assert tensor_memory(m, opt)["weights"] >= 4 * m.num_params()
    assert tensor_memory(m, opt)["weights"] < 4 * (m.num_params() + m.lm_head.weight.numel())


def test_pretraining_on_a_token_stream():
    torch.manual_seed(0)
    m = GPT(CFG)
    tokens = torch.arange(2000) % 50  # a periodic stream: easy to predict
    r = train(m, CorpusData(tokens, tokens, 16), quiet(steps=30, batch_size=8, lr=3e-3, eval_every=10))
    assert r["history"][-1]["loss"] < r["history"][0]["loss"]
    assert "test" not in r


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of a tensor's value into Python (.item(), int(t), bool(t)): on a GPU each one waits for every
    queued kernel. (.tolist() and .cpu() are not dispatched as such; this counts the per-value reads.)"""
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_training_step_reads_nothing_back_to_the_host(method):
    """The loop reads values only around the evaluations: 8 steps read exactly as often as 4 (same evaluations), so
    a step queues its kernels without waiting for the GPU. SGD: AdamW reads its CPU step counter, which is no sync."""
    from minilora import METHODS
    counts = []
    for steps in (4, 8):
        torch.manual_seed(0)
        m = attach(GPT(CFG), METHODS[method].config_cls())
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        with _HostReads() as reads:
            train(m, toy_task(64), quiet(steps=steps, eval_every=steps // 2, batch_size=4, eval_examples=8),
                  optimizer=opt)
        counts.append(reads.reads)
    assert counts[0] == counts[1], counts


def test_evaluate_takes_a_device_name_or_a_device():
    """CorpusData / TaskData.evaluate are called with "cpu" as well as torch.device("cpu")."""
    m = model().eval()
    tokens = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(0))
    data = CorpusData(tokens, tokens, CFG.block_size)
    assert data.evaluate(m, "val", 8, 4, "cpu") == data.evaluate(m, "val", 8, 4, torch.device("cpu"))
