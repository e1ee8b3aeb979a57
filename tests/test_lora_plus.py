"""LoRA+ (minilora/lora_plus.py): the optimizer's parameter groups equal PEFT's create_loraplus_optimizer's on the
same model (skipped without peft/transformers), one AdamW step moves B with λ times A's rate, train() uses it, and
λ = 1 is LoRA."""
import copy
import json
import os
import re
import warnings

import pytest
import torch

from minilora import GPT, GPTConfig, LoRAConfig, attach, load_adapter, save_adapter
from minilora.attach import ADAPTER_CONFIG
from minilora.lora_plus import LoRAPlusConfig
from minilora.train import Callback, CorpusData, TrainConfig, default_optimizer, train

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


def tokens(B=3, T=10, seed=0):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=1, std=0.1):
    """Nonzero A and B, as after training (at init B = 0, so A gets no gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if re.search(r"\.lora_\w+\.default(\.weight)?$", n):
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def backward(model, seed=0):
    model.train()
    x = tokens(seed=seed)
    model(x, torch.roll(x, -1, 1))[1].backward()


def test_bad_ratio_is_refused():
    with pytest.raises(ValueError, match="lr_ratio"):
        LoRAPlusConfig(lr_ratio=0)


def test_one_step_moves_B_by_lr_ratio_times_A():
    """AdamW's first step is lr·g/(|g| + eps) per entry (m̂ = g, v̂ = g²): A moves by η, B by λ·η, to rounding."""
    lr, ratio = 1e-3, 16.0
    model = randomize(attach(tiny(), LoRAPlusConfig(lr_ratio=ratio, targets="all-linear")))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    backward(model)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.minilora_config.optimizer(model, lr, 0.0).step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            rate = lr * ratio if ".lora_B." in n else lr
            g = grads[n]
            torch.testing.assert_close(p - before[n], -rate * g / (g.abs() + 1e-8), atol=1e-7, rtol=0)  # ulp of p
    moved = {k: torch.cat([(p.detach() - before[n]).abs().flatten() for n, p in model.named_parameters()
                           if f".lora_{k}." in n]).median() for k in "AB"}
    assert (moved["B"] / moved["A"]).item() == pytest.approx(ratio, rel=1e-3)


def test_train_uses_the_loraplus_optimizer():
    class Grab(Callback):
        def on_train_start(self, state):
            self.groups = [(len(g["params"]), g["initial_lr"], g["weight_decay"]) for g in state.optimizer.param_groups]

    grab = Grab()
    model = attach(tiny(), LoRAPlusConfig(lr_ratio=4.0, bias="all"))
    data = CorpusData(torch.randint(0, 64, (400,)), torch.randint(0, 64, (200,)), block_size=16)
    train(model, data, TrainConfig(steps=1, batch_size=2, eval_every=1, eval_examples=2, lr=1e-3, weight_decay=0.1,
                                   progress=False), callbacks=[grab])
    n_bias = sum(1 for n, p in model.named_parameters() if n.endswith(".bias"))  # every bias: bias="all"
    assert grab.groups == [(2, 1e-3, 0.1), (2, 4e-3, 0.1), (n_bias, 4e-3, 0.0)]  # A's, B's, biases (2 blocks)


def test_lr_ratio_1_is_lora():
    """λ = 1: the same AdamW updates as LoRA with train.default_optimizer (only the grouping differs)."""
    models = [randomize(attach(tiny(), LoRAPlusConfig(lr_ratio=1.0, bias="all"))),
              randomize(attach(tiny(), LoRAConfig(bias="all")))]
    opts = [models[0].minilora_config.optimizer(models[0], 1e-2, 0.1), default_optimizer(models[1], 1e-2, 0.1)]
    for i in range(3):
        for model, opt in zip(models, opts):
            backward(model, seed=i)
            opt.step()
            opt.zero_grad()
    for (n, p), (_, q) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0, msg=n)


def test_file_is_a_lora_file_and_peft_lora_files_load_as_lora(tmp_path):
    model = randomize(attach(tiny(), LoRAPlusConfig(lr_ratio=8.0)))
    save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["peft_type"] == "LORA" and raw["minilora_method"] == "lora_plus"
    assert type(load_adapter(tiny(), tmp_path).minilora_config) is LoRAPlusConfig
    assert load_adapter(tiny(), tmp_path).minilora_config.lr_ratio == 8.0
    del raw["minilora_method"], raw["minilora_config"]  # now a file as PEFT writes it
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(raw))
    assert type(load_adapter(tiny(), tmp_path).minilora_config) is LoRAConfig


# ------------------------------------------------------------------------ parity with PEFT
@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers", reason="transformers not installed: no PEFT parity")
    peft = pytest.importorskip("peft", reason="peft not installed: no PEFT parity")
    directory = tmp_path_factory.mktemp("hf_base")
    tiny(seed=3).save_pretrained(directory, hf=True)
    return directory, transformers, peft


PARITY = {  # our config, PEFT's LoraConfig arguments
    "c_attn": (LoRAPlusConfig(r=4, alpha=8), dict(r=4, lora_alpha=8, target_modules=["c_attn"])),
    "all-linear+bias": (LoRAPlusConfig(r=4, alpha=8, targets="all-linear", bias="all"),
                        dict(r=4, lora_alpha=8, target_modules="all-linear", bias="all")),
    "lora_only+embedding": (LoRAPlusConfig(r=4, alpha=8, bias="lora_only", embedding=True),
                            dict(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], bias="lora_only")),
}


def groups(optimizer, model, prefix=""):
    """{(lr, weight_decay): sorted parameter names} of the non-empty groups, names without PEFT's prefix."""
    names = {id(p): n.removeprefix(prefix) for n, p in model.named_parameters()}
    return {(g["lr"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"])
            for g in optimizer.param_groups if g["params"]}


@pytest.mark.parametrize("case", PARITY)
def test_param_groups_equal_peft_create_loraplus_optimizer(case, hf_base):
    directory, transformers, peft = hf_base
    from peft.optimizers import create_loraplus_optimizer
    config, theirs_args = PARITY[case]
    config = copy.deepcopy(config)
    config.lr_embedding = 3e-4
    ours = attach(GPT.from_pretrained(directory), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(directory),
                                     peft.LoraConfig(fan_in_fan_out=True, lora_dropout=0.0, **theirs_args))
    mine = groups(ours.minilora_config.optimizer(ours, 1e-3, 0.1), ours)
    peft_groups = groups(create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                                   loraplus_weight_decay=0.1, loraplus_lr_embedding=3e-4),
                         theirs, prefix="base_model.model.")
    assert mine == peft_groups
    assert (1e-3 * 16.0, 0.1) in mine and (1e-3, 0.1) in mine
