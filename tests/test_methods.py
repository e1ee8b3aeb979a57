"""One battery of assertions run over every registered method (as PEFT's test matrix does).

Each method is attached with its default config to a small random GPT; method-specific properties
(parameter-count formulas, paper equations) live in that method's own test file."""
import copy
import json

import pytest
import torch

import minilora
from minilora import METHODS, GPT, GPTConfig, attach, load_adapter, save_adapter
from minilora.attach import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from minilora.checkpoint import CheckpointError, load_safetensors

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=64)
NAMES = sorted(METHODS)


def make(method, cfg=CFG, seed=0):
    torch.manual_seed(seed)
    base = GPT(cfg).eval()
    model = copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    attach(model, METHODS[method].config_cls())
    return base, model


def batch(seed=0, cfg=CFG):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (4, 12), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def steps(model, n=2, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    model.train()
    for i in range(n):
        x, y = batch(i)
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize("method", NAMES)
def test_identity_at_init(method):
    base, model = make(method)
    x, _ = batch()
    if not getattr(model.minilora_config, "identity_at_init", True):
        pytest.skip(f"{method} changes the output at init by design (see its docstring)")
    assert torch.allclose(model(x)[0], base(x)[0], atol=1e-6)


@pytest.mark.parametrize("method", NAMES)
def test_base_weights_bit_identical_after_training(method):
    base, model = make(method)
    cfg = model.minilora_config
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    steps(model)
    for n, p in model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"{method}: frozen {n} changed"
    base_names = {n for n, _ in base.named_parameters()}
    trained_base = [n for n, p in model.named_parameters() if p.requires_grad and n in base_names]
    assert all(cfg.trainable(n) for n in trained_base)


@pytest.mark.parametrize("method", NAMES)
def test_every_trainable_param_gets_a_gradient(method):
    _, model = make(method)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names, f"{method} trains nothing"
    assert all(model.minilora_config.trainable(n) for n in names)
    # one step first: methods that zero-init one factor (LoRA's B, adapters' W_up) give the other
    # factor a zero gradient at step 0, by design
    steps(model, n=1)
    model.train()
    x, y = batch(5)
    model(x, y)[1].backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{method}: {n} gets no gradient"


@pytest.mark.parametrize("method", NAMES)
def test_save_load_gives_identical_logits(method, tmp_path):
    _, model = make(method)
    steps(model)
    save_adapter(model, tmp_path)
    fresh, _ = make(method)  # the same base weights, nothing attached
    load_adapter(fresh, tmp_path)
    x, _ = batch(3)
    assert torch.equal(fresh.eval()(x)[0], model(x)[0])


@pytest.mark.parametrize("method", NAMES)
def test_saved_file_holds_only_adapter_tensors(method, tmp_path):
    _, model = make(method)
    save_adapter(model, tmp_path)
    state = load_safetensors(tmp_path / ADAPTER_WEIGHTS)
    assert set(state) == set(minilora.adapter_state_dict(model))
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in state.values()) == n_trainable
    assert json.loads((tmp_path / ADAPTER_CONFIG).read_text())["minilora_method"] == method


@pytest.mark.parametrize("method", NAMES)
def test_loading_onto_another_model_names_the_keys(method, tmp_path):
    _, model = make(method)
    save_adapter(model, tmp_path)
    other_cfg = GPTConfig(n_layer=2, n_head=2, n_embd=48, vocab_size=64, block_size=64)
    other = GPT(other_cfg)
    with pytest.raises(CheckpointError, match="another model"):
        load_adapter(other, tmp_path)


@pytest.mark.parametrize("method", NAMES)
def test_truncated_adapter_is_a_clear_error(method, tmp_path):
    _, model = make(method)
    save_adapter(model, tmp_path)
    path = tmp_path / ADAPTER_WEIGHTS
    path.write_bytes(path.read_bytes()[:-7])
    fresh, _ = make(method)
    with pytest.raises(CheckpointError, match="truncated"):
        load_adapter(fresh, tmp_path)


@pytest.mark.parametrize("method", NAMES)
def test_train_and_eval_never_touch_weights(method):
    _, model = make(method)
    steps(model, n=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.eval()
    model.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", NAMES)
def test_generate_runs(method):
    _, model = make(method)
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)
    assert out.shape == (1, 7)


# ------------------------------------------------------------------------ device, dtype and mode at attach
def _added(model, before):
    """(name, tensor, owning module) of every parameter and buffer that attach created."""
    for mod_name, mod in model.named_modules():
        for kind in ("_parameters", "_buffers"):
            for k, t in getattr(mod, kind).items():
                if t is not None and id(t) not in before:
                    yield f"{mod_name}.{k}", t, mod, k


def _attach_to(method, *, device=None, dtype=None):
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = GPT(CFG)
    if dtype is not None:
        model.to(dtype)
    old = [*model.parameters(), *model.buffers()]  # held, so that no new tensor can reuse a freed one's id()
    torch.manual_seed(1)
    attach(model, METHODS[method].config_cls())
    return model, list(_added(model, {id(t) for t in old}))


@pytest.mark.parametrize("method", NAMES)
def test_attach_on_the_meta_device_creates_everything_on_meta(method):
    """A model built on `meta` (shapes, no memory: how a large model is laid out before its weights load) gets
    every tensor a method adds on meta too, so `to_empty` + load_state_dict can place them all at once."""
    model, added = _attach_to(method, device="meta")
    assert added or method == "full", f"{method} added nothing"  # full fine-tuning adds no tensor
    wrong = [f"{n} on {t.device}" for n, t, *_ in added if not t.is_meta]
    assert not wrong, f"{method}: {wrong[:4]}"


@pytest.mark.parametrize("method", NAMES)
def test_attach_to_a_bf16_model_creates_bf16_tensors_and_trains(method):
    """Every floating tensor a method adds is in the dtype of the weights it adapts (bf16 here), except the
    quantization constants its module documents as fp32 (`fp32_constants`); one forward and backward in bf16 run."""
    model, added = _attach_to(method, dtype=torch.bfloat16)
    wrong = [f"{n}: {t.dtype}" for n, t, mod, k in added
             if t.is_floating_point() and t.dtype != torch.bfloat16 and k not in getattr(mod, "fp32_constants", ())]
    assert not wrong, f"{method}: {wrong[:4]}"
    assert all(t.dtype in (torch.float32, torch.uint8) for n, t, mod, k in added  # uint8: c2 with double quant
               if k in getattr(mod, "fp32_constants", ()))
    model.train()
    x, y = batch(3)
    logits, loss = model(x, y)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.bfloat16 for g in grads)


@pytest.mark.parametrize("method", NAMES)
def test_attach_and_load_adapter_keep_the_model_in_eval_mode(method, tmp_path):
    """New modules take the model's mode: on a model in eval mode, dropout (and LongLoRA's S²-Attn) stay off, so
    the logits right after attach or load equal those after calling model.eval() again."""
    _, model = make(method)  # the base was put in eval mode before attach
    assert not any(m.training for m in model.modules()), f"{method}: modules left in training mode"
    save_adapter(model, tmp_path)
    fresh = GPT(CFG).eval()
    load_adapter(fresh, tmp_path)
    assert not any(m.training for m in fresh.modules())
    x, _ = batch(4)
    first = fresh(x)[0]
    assert torch.equal(first, fresh.eval()(x)[0])
    trained = GPT(CFG).train()
    attach(trained, METHODS[method].config_cls())
    assert all(m.training for m in trained.modules())
