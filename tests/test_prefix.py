"""Prefix tuning: the prefix is extra keys/values in every layer, masks and positions stay right,
folding the MLP keeps the logits, parameter counts."""
import copy
import math

import pytest
import torch

import minilora
from minilora import GPT, GPTConfig, PrefixConfig, attach, load_adapter, save_adapter
from minilora.prefix import PrefixAttention, fold_reparameterization, prefix_param_count

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)


def pair(config, seed=0):
    torch.manual_seed(seed)
    base = GPT(CFG).eval()
    torch.manual_seed(seed + 1)
    model = attach(copy.deepcopy(base), config)
    return base, model


def idx(seed=0, shape=(3, 10)):
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_not_identity_at_init():
    assert PrefixConfig.identity_at_init is False
    base, model = pair(PrefixConfig())
    x = idx()
    assert not torch.allclose(model(x)[0], base(x)[0], atol=1e-4)


@pytest.mark.parametrize("reparameterize", [True, False])
def test_zero_virtual_tokens_equals_base(reparameterize):
    base, model = pair(PrefixConfig(num_virtual_tokens=0, reparameterize=reparameterize))
    x = idx()
    # P = 0 takes the attention's explicit-mask path with no extra key: the causal result, not bitwise
    assert torch.allclose(model(x)[0], base(x)[0], atol=1e-6)


def by_hand(base, prefix_kv, x):
    """The base GPT run by hand with prefix_kv (L, 2, nh, P, hs) concatenated to keys and values."""
    tr, C, nh = base.transformer, CFG.n_embd, CFG.n_head
    hs = C // nh
    B, T = x.shape
    h = tr.wte(x) + tr.wpe(torch.arange(T))  # positions 0..T-1: nothing is prepended to the input
    for layer, block in enumerate(tr.h):
        q, k, v = block.attn.c_attn(block.ln_1(h)).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        pk, pv = (t.expand(B, -1, -1, -1) for t in prefix_kv[layer])  # (B, nh, P, hs)
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, nh, P + T, hs)
        P = pk.size(2)
        att = q @ k.transpose(-2, -1) / math.sqrt(hs)  # (B, nh, T, P + T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        allowed = torch.cat([torch.ones(T, P, dtype=torch.bool), causal], dim=1)  # prefix always visible
        att = att.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        h = h + block.attn.c_proj(y)
        h = h + block.mlp(block.ln_2(h))
    return base.lm_head(tr.ln_f(h))


@pytest.mark.parametrize("reparameterize", [True, False])
def test_prefix_equals_extra_kv_computed_by_hand(reparameterize):
    base, model = pair(PrefixConfig(num_virtual_tokens=3, reparameterize=reparameterize, hidden=16))
    enc = model.transformer.h[0].attn.prefix_encoder
    P, L, nh, hs = 3, CFG.n_layer, CFG.n_head, CFG.n_embd // CFG.n_head
    with torch.no_grad():
        flat = enc.prefix_mlp(enc.prefix_tokens) if reparameterize else enc.prefix  # (P, L·2·C)
        # layout of P_θ: layer-major, then key/value, then heads
        prefix_kv = flat.view(P, L, 2, nh, hs).permute(1, 2, 3, 0, 4)  # (L, 2, nh, P, hs)
        x = idx()
        assert torch.allclose(model(x)[0], by_hand(base, prefix_kv, x), atol=1e-5)


def test_one_encoder_shared_by_every_layer():
    _, model = pair(PrefixConfig())
    encs = {id(b.attn.prefix_encoder) for b in model.transformer.h}
    assert len(encs) == 1 and all(isinstance(b.attn, PrefixAttention) for b in model.transformer.h)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(n.startswith("transformer.h.0.attn.prefix_encoder.") for n in names)


def test_attention_mask_still_works():
    _, model = pair(PrefixConfig(num_virtual_tokens=4))
    x = idx()
    ones = torch.ones_like(x)
    assert torch.allclose(model(x, attention_mask=ones)[0], model(x)[0], atol=1e-5)
    mask = ones.clone()
    mask[:, :3] = 0  # left padding: the padded tokens must not matter, the prefix still does
    y = x.clone()
    y[:, :3] = (y[:, :3] + 1) % CFG.vocab_size
    out_x, out_y = model(x, attention_mask=mask)[0], model(y, attention_mask=mask)[0]
    assert torch.allclose(out_x[:, 3:], out_y[:, 3:], atol=1e-5)


@pytest.mark.parametrize("reparameterize", [True, False])
def test_fold_keeps_logits_and_is_idempotent(reparameterize, tmp_path):
    _, model = pair(PrefixConfig(num_virtual_tokens=4, reparameterize=reparameterize, hidden=16))
    x = idx()
    before = model(x)[0]
    fold_reparameterization(model)
    fold_reparameterization(model)
    enc = model.transformer.h[0].attn.prefix_encoder
    assert enc.prefix_mlp is None and enc.prefix_tokens is None
    assert torch.allclose(model(x)[0], before, atol=1e-6)
    assert model.minilora_config.reparameterize is False
    P, L, C = 4, CFG.n_layer, CFG.n_embd
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == P * 2 * L * C
    save_adapter(model, tmp_path)  # the folded prefix saves and loads as a directly trained one
    torch.manual_seed(0)
    fresh = load_adapter(GPT(CFG).eval(), tmp_path)
    assert torch.equal(fresh(x)[0], model(x)[0])


@pytest.mark.parametrize("reparameterize", [True, False])
def test_save_load_round_trip(reparameterize, tmp_path):
    _, model = pair(PrefixConfig(num_virtual_tokens=5, reparameterize=reparameterize, hidden=24))
    save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = load_adapter(GPT(CFG).eval(), tmp_path)
    assert fresh.minilora_config == model.minilora_config
    x = idx()
    assert torch.equal(fresh(x)[0], model(x)[0])


@pytest.mark.parametrize("reparameterize", [True, False])
def test_param_count_formula(reparameterize):
    config = PrefixConfig(num_virtual_tokens=6, reparameterize=reparameterize, hidden=20)
    _, model = pair(config)
    P, L, C, h = 6, CFG.n_layer, CFG.n_embd, 20
    expected = P * C + C * h + h + h * 2 * L * C + 2 * L * C if reparameterize else P * 2 * L * C
    assert model.num_params(trainable_only=True) == prefix_param_count(config, L, C) == expected


def test_param_count_on_tiny_preset_matches_lesson():
    # lessons/02-prefix.md: P = 10, L = 4, C = 128, hidden = 512
    cfg = minilora.PRESETS["tiny"]
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (4, 4, 128)
    model = attach(GPT(cfg), PrefixConfig())
    assert model.num_params(trainable_only=True) == 1_280 + 66_048 + 525_312 == 592_640
    assert prefix_param_count(PrefixConfig(), 4, 128) == 592_640
    fold_reparameterization(model)  # what inference keeps: P·2·L·C
    assert model.num_params(trainable_only=True) == 10_240
    model = attach(GPT(cfg), PrefixConfig(reparameterize=False))
    assert model.num_params(trainable_only=True) == prefix_param_count(model.minilora_config, 4, 128) == 10_240


def test_vocab_init():
    torch.manual_seed(5)
    ids = torch.randint(CFG.vocab_size, (4,))
    base, model = pair(PrefixConfig(num_virtual_tokens=4, init="vocab"), seed=4)  # seed + 1 = 5
    enc = model.transformer.h[0].attn.prefix_encoder
    assert torch.equal(enc.prefix_tokens, base.transformer.wte(ids))  # P' = the tokens' embeddings
    base, model = pair(PrefixConfig(num_virtual_tokens=4, init="vocab", reparameterize=False), seed=4)
    enc = model.transformer.h[0].attn.prefix_encoder
    # P_θ = the keys/values the frozen model computes for those tokens ("real words", paper Fig. 5)
    tr, C = base.transformer, CFG.n_embd
    h0 = tr.h[0].ln_1(tr.wte(ids) + tr.wpe(torch.arange(4)))
    _, k0, v0 = tr.h[0].attn.c_attn(h0).split(C, dim=1)  # (P, C) each
    assert torch.allclose(enc.prefix[:, :C], k0) and torch.allclose(enc.prefix[:, C:2 * C], v0)
    h1 = tr.h[1].ln_1(tr.h[0](tr.wte(ids)[None] + tr.wpe(torch.arange(4)))[0])
    _, k1, _ = tr.h[1].attn.c_attn(h1).split(C, dim=1)
    assert torch.allclose(enc.prefix[:, 2 * C:3 * C], k1, atol=1e-6)


def test_generate_runs_up_to_the_full_block_size():
    _, model = pair(PrefixConfig(num_virtual_tokens=10))
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), CFG.block_size, temperature=0)
    assert out.shape == (1, 3 + CFG.block_size)  # the prefix takes no position


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        pair(PrefixConfig(num_virtual_tokens=-1))
    with pytest.raises(ValueError, match="init"):
        pair(PrefixConfig(init="zeros"))
    with pytest.raises(ValueError, match="block_size"):
        pair(PrefixConfig(num_virtual_tokens=CFG.block_size + 1, init="vocab", reparameterize=False))
    with pytest.raises(ValueError, match="prefix tuning attached"):
        fold_reparameterization(GPT(CFG))
