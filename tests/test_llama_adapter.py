"""LLaMA-Adapter (minilora/llama_adapter.py): zero-init gated prompt attention, paper eq. 7."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from minilora import GPT, GPTConfig, attach
from minilora.llama_adapter import AdaptedAttention, LlamaAdapterConfig

CFG = GPTConfig(n_layer=3, n_head=2, n_embd=16, vocab_size=32, block_size=32)


def pair(config=None, seed=0):
    torch.manual_seed(seed)
    base = GPT(CFG).eval()
    return base, attach(copy.deepcopy(base), config or LlamaAdapterConfig(adapter_len=4))


def tokens(B=2, T=7, seed=1):
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def randomize_gates(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("adaption_gate"):
                p.copy_(torch.randn(p.shape, generator=g))


def test_identity_at_init_zero_gate():
    base, model = pair()
    idx = tokens()
    assert torch.equal(model(idx)[0], base(idx)[0])


def test_nonzero_gate_init_changes_the_output_at_init():
    base, model = pair(LlamaAdapterConfig(adapter_len=4, gate_init=0.5))
    idx = tokens()
    assert not torch.allclose(model(idx)[0], base(idx)[0], atol=1e-4)


def test_only_the_top_layers_get_prompts_and_the_count_is_L_times_KC_plus_nh():
    _, model = pair(LlamaAdapterConfig(adapter_len=4, adapter_layers=2))
    adapted = [i for i, b in enumerate(model.transformer.h) if isinstance(b.attn, AdaptedAttention)]
    assert adapted == [1, 2]
    assert model.num_params(trainable_only=True) == 2 * (4 * CFG.n_embd + CFG.n_head)


def eq7_reference(attn: AdaptedAttention, x):
    """Paper eq. 7 written out: scores over [prompt; tokens], the two parts softmaxed separately,
    the prompt part scaled by tanh(g) per head, one weighted sum over [V_p; V], then W_o."""
    base, C = attn.base, x.size(-1)
    nh, hs = base.n_head, C // base.n_head
    q, k, v = base.c_attn(x).split(C, dim=2)
    _, kp, vp = base.c_attn(attn.adaption_prompt).split(C, dim=1)
    heads = lambda t: t.view(*t.shape[:-1], nh, hs).transpose(-3, -2)  # (..., L, C) -> (..., nh, L, hs)
    q, k, v, kp, vp = map(heads, (q, k, v, kp, vp))
    T = x.size(1)
    s_tok = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
    s_tok = s_tok.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    s_p = (q @ kp.transpose(-2, -1)) / math.sqrt(hs)
    gate = torch.tanh(attn.adaption_gate).view(1, nh, 1, 1)
    weights = torch.cat([gate * s_p.softmax(-1), s_tok.softmax(-1)], dim=-1)  # (B, nh, T, K + T)
    y = weights @ torch.cat([vp.expand(x.size(0), -1, -1, -1), v], dim=2)
    return base.c_proj(y.transpose(1, 2).reshape(x.shape))


def test_adapted_attention_equals_paper_eq7():
    _, model = pair()
    randomize_gates(model)
    attn = model.transformer.h[1].attn
    x = torch.randn(2, 6, CFG.n_embd, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(attn(x), eq7_reference(attn, x), atol=1e-5)


def test_a_joint_softmax_would_disturb_the_tokens_even_with_zero_prompt_values():
    """Why the prompt gets its own softmax: in one softmax over [prompt; tokens] (prefix tuning) the
    prompt keys take weight from the tokens, so even prompts whose values are 0 change the output at
    init; the separate softmax times tanh(0) = 0 changes nothing."""
    _, model = pair()
    attn = model.transformer.h[0].attn
    x = torch.randn(1, 5, CFG.n_embd, generator=torch.Generator().manual_seed(4))
    C, nh, hs = CFG.n_embd, CFG.n_head, CFG.n_embd // CFG.n_head
    q, k, v = (t.view(1, 5, nh, hs).transpose(1, 2) for t in attn.base.c_attn(x).split(C, dim=2))
    kp = attn.base.c_attn(attn.adaption_prompt)[:, C:2 * C].view(-1, nh, hs).transpose(0, 1)  # (nh, K, hs)
    K = kp.size(1)
    mask = torch.cat([torch.ones(5, K, dtype=torch.bool), torch.ones(5, 5, dtype=torch.bool).tril()], 1)
    joint = F.scaled_dot_product_attention(q, torch.cat([kp.expand(1, -1, -1, -1), k], 2),
                                           torch.cat([torch.zeros(1, nh, K, hs), v], 2), attn_mask=mask)
    joint_out = attn.base.c_proj(joint.transpose(1, 2).reshape(1, 5, C))
    assert not torch.allclose(joint_out, attn.base(x), atol=1e-4)
    assert torch.equal(attn(x), attn.base(x))


def test_step0_gradient_reaches_the_gates_not_the_prompts():
    _, model = pair()
    model.train()
    idx = tokens()
    model(idx, torch.roll(idx, -1, 1))[1].backward()
    for n, p in model.named_parameters():
        if n.endswith("adaption_gate"):
            assert p.grad.abs().sum() > 0, n
        elif n.endswith("adaption_prompt"):
            assert p.grad.abs().sum() == 0, n  # multiplied by tanh(0) = 0


def test_padding_mask_path_matches_the_unpadded_run():
    _, model = pair()
    randomize_gates(model)
    idx = tokens(B=1, T=6)
    padded = torch.cat([idx, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1)
    assert torch.allclose(model(padded, attention_mask=mask)[0][:, :6], model(idx)[0], atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(adapter_layers=0), dict(adapter_layers=4), dict(adapter_len=0)])
def test_bad_sizes_are_clear_errors(kwargs):
    with pytest.raises(ValueError, match="adapter_layers"):
        pair(LlamaAdapterConfig(**kwargs))
