"""The GPT: shapes, init, causality, masks, generation, and loading/saving both checkpoint formats."""
import json
import math

import pytest
import torch

from minilora.checkpoint import CheckpointError
from minilora.gpt import GPT, PRESETS, GPTConfig

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_shapes_and_names(model):
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 64) and loss is None
    names = dict(model.named_parameters())
    for key in ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
                "transformer.h.1.ln_2.bias", "transformer.ln_f.weight"]:
        assert key in names
    assert names["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)  # nn.Linear: (out, in)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_preset_sizes_match_gpt2():
    # GPT-2 small has 124,439,808 parameters (tied head counted once)
    with torch.device("meta"):
        assert GPT(PRESETS["gpt2"]).num_params() == 124_439_808
    assert 1_000_000 < GPT(PRESETS["tiny"]).num_params() < 2_000_000


def test_loss_at_init_is_log_vocab(model):
    torch.manual_seed(1)
    idx, targets = torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(64)) < 0.1


def test_causal_future_tokens_change_nothing(model):
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 64
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_ignore_index_masks_loss(model):
    idx = torch.randint(0, 64, (2, 8))
    targets = idx.clone()
    targets[:, :4] = -100
    logits, loss = model(idx, targets)
    ref = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 64), idx[:, 4:].reshape(-1))
    assert torch.allclose(loss, ref)


def test_explicit_path_equals_fused_path(model):
    x = torch.randn(2, 10, 32)
    attn = model.transformer.h[0].attn
    ones = torch.ones(2, 10)
    assert torch.allclose(attn(x), attn(x, attention_mask=ones), atol=1e-6)
    empty = torch.zeros(2, 2, 0, 16)
    assert torch.allclose(attn(x), attn(x, extra_kv=(empty, empty)), atol=1e-6)


def test_extra_kv_equals_attention_by_hand(model):
    torch.manual_seed(2)
    attn = model.transformer.h[0].attn
    B, T, C, nh, P = 2, 5, 32, 2, 3
    hs = C // nh
    x, pk, pv = torch.randn(B, T, C), torch.randn(B, nh, P, hs), torch.randn(B, nh, P, hs)
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs)  # (B, nh, T, P + T)
    future = torch.ones(T, T).triu(1).bool()
    scores[..., P:] = scores[..., P:].masked_fill(future, float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    assert torch.allclose(attn(x, extra_kv=(pk, pv)), attn.c_proj(y), atol=1e-5)


def test_padding_mask_hides_padded_keys(model):
    # left-padded row: the real tokens' outputs equal those of the unpadded sequence
    idx = torch.randint(1, 64, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    x = model.transformer.wte(padded)
    attn = model.transformer.h[0].attn
    y_pad = attn(x, attention_mask=mask)[:, 3:]
    y = attn(model.transformer.wte(idx))
    assert torch.allclose(y_pad, y, atol=1e-5)
    assert torch.isfinite(attn(x, attention_mask=mask)).all()  # fully padded queries are not NaN


def test_too_long_sequence_is_a_clear_error(model):
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


def test_generate_greedy_is_argmax_and_stops_at_eos(model):
    idx = torch.randint(0, 64, (2, 4))
    out = model.generate(idx, 5, temperature=0)
    assert out.shape == (2, 9) and torch.equal(out[:, :4], idx)
    logits, _ = model(idx)
    assert torch.equal(out[:, 4], logits[:, -1].argmax(-1))
    first = int(out[0, 4])
    out2 = model.generate(idx[:1], 5, temperature=0, eos_id=first)
    assert out2.shape == (1, 5)  # stopped right after producing eos


def test_generate_sampling_is_seeded_and_top_k_respected(model):
    idx = torch.randint(0, 64, (1, 3))
    a = model.generate(idx, 6, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    b = model.generate(idx, 6, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    logits, _ = model(idx)
    assert int(a[0, 3]) in torch.topk(logits[0, -1], 3).indices.tolist()


def test_save_and_load_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 64, (2, 8))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_hf_format_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path, hf=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "gpt2" and raw["n_embd"] == 32
    loaded = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 64, (2, 8))
    assert torch.equal(model(idx)[0], loaded(idx)[0])


def test_hf_transformers_logits_match(model, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    model.save_pretrained(tmp_path, hf=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.allclose(hf(idx).logits, model(idx)[0], atol=1e-5)
    # and a checkpoint written by transformers itself loads back
    hf.save_pretrained(tmp_path / "from_hf")
    again = GPT.from_pretrained(tmp_path / "from_hf").eval()
    assert torch.allclose(again(idx)[0], model(idx)[0], atol=1e-5)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        GPT.from_pretrained(tmp_path)


def test_truncated_checkpoint_is_a_clear_error(model, tmp_path):
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        GPT.from_pretrained(tmp_path)


def test_checkpoint_for_another_shape_names_the_keys(model, tmp_path):
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["model"]["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="transformer.h.2"):
        GPT.from_pretrained(tmp_path)


def test_unknown_override_is_named(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dropuot"):
        GPT.from_pretrained(tmp_path, dropuot=0.1)


def test_save_is_atomic_on_failure(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()
    import minilora.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before  # the old file survives
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no debris


def test_train_eval_do_not_touch_weights(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
