"""Bottleneck adapters: the equation, both placements, the parallel form, identity at init, counts."""
import copy

import pytest
import torch
import torch.nn.functional as F

import minilora
from minilora import GPT, GPTConfig, AdapterConfig, PfeifferConfig, attach, load_adapter, save_adapter
from minilora.adapters import Adapter, adapter_param_count

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)


def pair(config, seed=0):
    torch.manual_seed(seed)
    base = GPT(CFG).eval()
    model = attach(copy.deepcopy(base), config)
    return base, model


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def idx(seed=0, shape=(3, 10)):
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [AdapterConfig(), PfeifferConfig(), AdapterConfig(parallel=True)])
def test_identity_at_init(config):
    base, model = pair(config)
    assert type(config).identity_at_init
    x = idx()
    assert torch.equal(model(x)[0], base(x)[0])  # W_up = 0, b_up = 0: h + 0 exactly


def test_down_projection_is_truncated_normal_and_up_is_zero():
    _, model = pair(AdapterConfig(init_std=1e-2))
    a = model.transformer.h[0].attn
    assert isinstance(a, Adapter) and a.adapter_down.weight.shape == (2, 32)  # (m, C), m = 32 // 16
    assert a.adapter_down.weight.abs().max() <= 2e-2  # truncated at 2σ
    assert a.adapter_down.weight.abs().sum() > 0
    assert not a.adapter_up.weight.any() and not a.adapter_up.bias.any()


def manual_forward(model, x, parallel=False, placement="houlsby"):
    """Run the adapted GPT by hand: x + A(attn(ln_1 x)), then x + A(mlp(ln_2 x))."""
    def adapter(a, inp, out):
        z = F.gelu((inp if parallel else out) @ a.adapter_down.weight.T + a.adapter_down.bias)  # (B, T, m)
        return out + z @ a.adapter_up.weight.T + a.adapter_up.bias  # (B, T, C)

    tr = model.transformer
    T = x.size(1)
    h = tr.wte(x) + tr.wpe(torch.arange(T))
    for block in tr.h:
        attn, mlp = block.attn, block.mlp
        inp = block.ln_1(h)
        if placement == "houlsby":
            h = h + adapter(attn, inp, attn.base(inp))
        else:
            h = h + attn(inp)
        inp = block.ln_2(h)
        h = h + adapter(mlp, inp, mlp.base(inp))
    return model.lm_head(tr.ln_f(h))


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_forward_equals_equation(parallel, placement):
    _, model = pair(AdapterConfig(placement=placement, parallel=parallel))
    randomize_adapters(model)
    x = idx()
    expected = manual_forward(model, x, parallel, placement)
    assert torch.allclose(model(x)[0], expected, atol=1e-5)


def test_pfeiffer_adapts_only_the_mlp():
    _, model = pair(PfeifferConfig())
    for block in model.transformer.h:
        assert isinstance(block.mlp, Adapter) and not isinstance(block.attn, Adapter)
    assert model.minilora_config.nonlinearity == "relu"  # AdapterHub's default for this variant
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ln_" in n)


def test_layernorms_train_only_when_asked():
    _, model = pair(AdapterConfig())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.h.0.ln_1.weight" in names and "transformer.ln_f.bias" in names
    assert "transformer.h.0.attn.base.c_attn.weight" not in names and "transformer.wte.weight" not in names
    _, model = pair(AdapterConfig(train_layernorms=False))
    assert all(".adapter_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_param_count_formula_per_adapter():
    _, model = pair(AdapterConfig(bottleneck=5, train_layernorms=False))
    a = model.transformer.h[1].mlp
    assert sum(p.numel() for n, p in a.named_parameters() if "adapter_" in n) == 2 * 5 * 32 + 5 + 32
    assert model.num_params(trainable_only=True) == 2 * 2 * adapter_param_count(32, 5)


def test_param_count_on_tiny_preset_matches_lesson():
    # lessons/01-adapters.md: C = 128, m = 128 // 16 = 8, 2·8·128 + 8 + 128 = 2,184 per adapter
    cfg = minilora.PRESETS["tiny"]
    assert adapter_param_count(128, 8) == 2_184
    torch.manual_seed(0)
    houlsby = attach(GPT(cfg), AdapterConfig())
    assert houlsby.num_params(trainable_only=True) == 8 * 2_184 + 4 * 2 * 2 * 128 + 2 * 128 == 19_776
    pfeiffer = attach(GPT(cfg), PfeifferConfig())
    assert pfeiffer.num_params(trainable_only=True) == 4 * 2_184 == 8_736


def test_bottleneck_overrides_reduction_factor():
    _, model = pair(AdapterConfig(reduction_factor=16, bottleneck=7))
    assert model.transformer.h[0].attn.adapter_down.weight.shape == (7, 32)


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="reduction_factor"):
        pair(AdapterConfig(reduction_factor=64))
    with pytest.raises(ValueError, match="placement"):
        pair(AdapterConfig(placement="after-everything"))
    with pytest.raises(ValueError, match="nonlinearity"):
        pair(AdapterConfig(nonlinearity="swish"))


def test_zero_up_projection_gives_down_a_zero_gradient_at_step_0():
    # the paper-style init (W_up = 0) means dL/dW_down = W_up^T (...) = 0 at the first backward
    _, model = pair(AdapterConfig())
    x = idx()
    model(x, torch.roll(x, -1, 1))[1].backward()
    a = model.transformer.h[0].mlp
    assert not a.adapter_down.weight.grad.any() and a.adapter_up.weight.grad.abs().sum() > 0


def test_attention_mask_passes_through():
    base, model = pair(AdapterConfig())
    randomize_adapters(model)
    x = idx()
    ones = torch.ones_like(x)
    assert torch.allclose(model(x, attention_mask=ones)[0], model(x)[0], atol=1e-5)
    mask = ones.clone()
    mask[:, :3] = 0  # left padding: changing the padded tokens changes nothing after them
    y = x.clone()
    y[:, :3] = (y[:, :3] + 1) % CFG.vocab_size
    assert torch.allclose(model(x, attention_mask=mask)[0][:, 3:], model(y, attention_mask=mask)[0][:, 3:],
                          atol=1e-5)


@pytest.mark.parametrize("config", [AdapterConfig(parallel=True, nonlinearity="relu", bottleneck=3),
                                    PfeifferConfig(reduction_factor=8)])
def test_save_load_round_trip_keeps_config_and_logits(config, tmp_path):
    _, model = pair(config)
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = load_adapter(GPT(CFG).eval(), tmp_path)
    assert fresh.minilora_config == config
    x = idx()
    assert torch.equal(fresh(x)[0], model(x)[0])
