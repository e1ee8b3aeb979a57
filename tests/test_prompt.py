"""Prompt tuning: the prompt is vectors prepended to the input, the head drops them, masks and the
block_size limit, the inits, P-tuning's encoder, parameter counts."""
import copy

import pytest
import torch
import torch.nn.functional as F

import minilora
from minilora import GPT, GPTConfig, PromptConfig, attach, load_adapter, save_adapter
from minilora.prompt import PromptEmbedding, prompt_param_count
from minilora.tokenizer import get_tokenizer

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)


def pair(config, seed=0, cfg=CFG):
    torch.manual_seed(seed)
    base = GPT(cfg).eval()
    torch.manual_seed(seed + 1)
    model = attach(copy.deepcopy(base), config)
    return base, model


def idx(seed=0, shape=(3, 10)):
    return torch.randint(0, CFG.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_not_identity_at_init():
    assert PromptConfig.identity_at_init is False
    base, model = pair(PromptConfig(num_virtual_tokens=4))
    x = idx()
    assert not torch.allclose(model(x)[0], base(x)[0], atol=1e-4)


def by_hand(base, prompt, x):
    """Prepend the prompt (P, C) to the token embeddings by hand and run the base GPT's blocks."""
    tr = base.transformer
    P, T = prompt.size(0), x.size(1)
    h = torch.cat([prompt.expand(x.size(0), -1, -1), tr.wte(x)], dim=1)  # (B, P + T, C)
    h = h + tr.wpe(torch.arange(P + T))  # the prompt takes positions 0..P-1, the tokens P..P+T-1
    for block in tr.h:
        h = block(h)
    return base.lm_head(tr.ln_f(h))[:, P:]  # (B, T, V)


@pytest.mark.parametrize("encoder", [None, "mlp", "lstm"])
def test_prompt_equals_prepending_by_hand(encoder):
    base, model = pair(PromptConfig(num_virtual_tokens=5, encoder=encoder))
    x = idx()
    with torch.no_grad():
        prompt = model.transformer.wte.prompt()  # (P, C): the embeddings, or the encoder's output
        expected = by_hand(base, prompt, x)
        logits, loss = model(x, torch.roll(x, -1, 1))
    assert logits.shape == (3, 10, CFG.vocab_size)
    assert torch.allclose(logits, expected, atol=1e-5)
    # the loss lines up with targets (B, T): the prompt positions are not scored
    assert torch.allclose(loss, F.cross_entropy(expected.reshape(-1, 64), torch.roll(x, -1, 1).reshape(-1)))


def test_tie_between_wte_and_lm_head_stays():
    _, model = pair(PromptConfig(num_virtual_tokens=4))
    assert model.lm_head.base.weight is model.transformer.wte.base.weight
    assert not model.transformer.wte.base.weight.requires_grad


def test_vocab_init_copies_embedding_rows():
    base, model = pair(PromptConfig(num_virtual_tokens=6, init="vocab"))
    wte = base.transformer.wte.weight  # (V, C)
    for row in model.transformer.wte.prompt_embeddings:
        assert (wte == row).all(dim=1).any()


def test_random_init_is_uniform_half():
    _, model = pair(PromptConfig(num_virtual_tokens=15, init="random"))
    e = model.transformer.wte.prompt_embeddings
    assert e.min() >= -0.5 and e.max() <= 0.5 and e.std() > 0.25  # U[-0.5, 0.5] has std 0.289


def test_init_from_text_equals_those_tokens_embeddings():
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=4096, block_size=32)  # minilora's vocab
    text = "positive or negative"
    ids = get_tokenizer("minilora").encode(text)
    P = 2 * len(ids) + 1
    base, model = pair(PromptConfig(num_virtual_tokens=P, init="text", init_text=text), cfg=cfg)
    expected = base.transformer.wte(torch.tensor((ids * 3)[:P]))  # repeated, then cropped to P
    assert torch.equal(model.transformer.wte.prompt_embeddings, expected)
    with pytest.raises(ValueError, match="vocabulary"):
        pair(PromptConfig(num_virtual_tokens=4, init="text", init_text=text))  # CFG's vocabulary has only 64 tokens


def test_attention_mask_is_widened_by_the_prompt():
    _, model = pair(PromptConfig(num_virtual_tokens=4))
    x = idx(shape=(3, 8))
    ones = torch.ones_like(x)
    assert torch.allclose(model(x, attention_mask=ones)[0], model(x)[0], atol=1e-5)
    mask = ones.clone()
    mask[:, :3] = 0  # left padding: the padded tokens must not matter, the prompt still does
    y = x.clone()
    y[:, :3] = (y[:, :3] + 1) % CFG.vocab_size
    out_x, out_y = model(x, attention_mask=mask)[0], model(y, attention_mask=mask)[0]
    assert torch.allclose(out_x[:, 3:], out_y[:, 3:], atol=1e-5)


def test_inputs_longer_than_block_size_minus_p_are_a_clear_error():
    _, model = pair(PromptConfig(num_virtual_tokens=6))
    model(idx(shape=(1, 10)))  # 6 + 10 = block_size: fits
    with pytest.raises(ValueError, match=r"at most block_size - P = 10 tokens"):
        model(idx(shape=(1, 11)))


def test_generate_within_the_effective_block_size():
    _, model = pair(PromptConfig(num_virtual_tokens=6))
    # the last step reads 3 + 8 - 1 = 10 = block_size - P tokens
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 8, temperature=0)
    assert out.shape == (1, 11)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 9, temperature=0)


@pytest.mark.parametrize("encoder", [None, "mlp", "lstm"])
def test_save_load_round_trip(encoder, tmp_path):
    _, model = pair(PromptConfig(num_virtual_tokens=3, encoder=encoder, encoder_hidden=8))
    save_adapter(model, tmp_path)
    torch.manual_seed(0)
    fresh = load_adapter(GPT(CFG).eval(), tmp_path)
    assert fresh.minilora_config == model.minilora_config
    x = idx()
    assert torch.equal(fresh(x)[0], model(x)[0])


@pytest.mark.parametrize("encoder", [None, "mlp", "lstm"])
def test_param_count_formula(encoder):
    config = PromptConfig(num_virtual_tokens=7, encoder=encoder, encoder_hidden=12)
    _, model = pair(config)
    P, C, h = 7, CFG.n_embd, 12
    expected = {None: P * C, "mlp": P * C + (C * h + h) + (h * C + C),
                "lstm": P * C + 2 * (4 * h * (C + h) + 8 * h) + (2 * h * h + h) + (h * C + C)}[encoder]
    assert model.num_params(trainable_only=True) == prompt_param_count(config, C) == expected


def test_param_count_on_tiny_preset_matches_lesson():
    # lessons/03-prompt.md: P = 20, C = 128 -> 2,560; with the MLP encoder (h = C) 35,584 in all
    torch.manual_seed(0)
    model = attach(GPT(minilora.PRESETS["tiny"]), PromptConfig())
    assert model.num_params(trainable_only=True) == 20 * 128 == 2_560
    assert prompt_param_count(PromptConfig(encoder="mlp"), 128) == 2_560 + 2 * 128 * 128 + 128 + 128 == 35_584


def test_bad_configs_are_clear_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        pair(PromptConfig(num_virtual_tokens=CFG.block_size))
    with pytest.raises(ValueError, match="init_text"):
        pair(PromptConfig(num_virtual_tokens=4, init="text"))
    with pytest.raises(ValueError, match="init_text"):
        pair(PromptConfig(num_virtual_tokens=4, init="vocab", init_text="hello"))
    with pytest.raises(ValueError, match="encoder"):
        pair(PromptConfig(num_virtual_tokens=4, encoder="transformer"))
    assert isinstance(pair(PromptConfig(num_virtual_tokens=4))[1].transformer.wte, PromptEmbedding)
