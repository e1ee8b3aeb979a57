"""The attach point: target selection, trainable marking, the registry and adapter files."""
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import minilora
from minilora import GPT, GPTConfig, FullConfig, attach, load_adapter, save_adapter
from minilora.attach import ADAPTER_CONFIG, METHODS, MethodConfig, find_targets, mark_trainable, register
from minilora.checkpoint import CheckpointError

CFG = GPTConfig(n_layer=3, n_head=2, n_embd=32, vocab_size=64, block_size=16)


def gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG)


def test_targets_by_suffix():
    names = find_targets(gpt(), ["c_attn", "mlp.c_proj"])
    assert names == [f"transformer.h.{i}.{m}" for i in range(3) for m in ("attn.c_attn", "mlp.c_proj")]


def test_targets_by_regex_must_match_whole_name():
    assert find_targets(gpt(), r"transformer\.h\.[01]\.attn\.c_attn") == [
        "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    with pytest.raises(ValueError, match="match no"):
        find_targets(gpt(), r"c_attn")  # a regex is a full match, not a search


def test_targets_all_linear_excludes_head():
    names = find_targets(gpt(), "all-linear")
    assert len(names) == 3 * 4 and "lm_head" not in names


def test_targets_by_layer():
    assert find_targets(gpt(), ["c_fc"], layers=[2]) == ["transformer.h.2.mlp.c_fc"]


def test_targets_matching_nothing_list_candidates():
    with pytest.raises(ValueError, match="candidates"):
        find_targets(gpt(), ["q_proj"])


def test_full_finetuning_trains_everything_or_chosen_layers():
    m = attach(gpt(), FullConfig())
    assert all(p.requires_grad for p in m.parameters())
    m = attach(gpt(), FullConfig(layers=[2]))
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("transformer.h.2.") for n in trainable)


def test_full_finetuning_bad_layer_is_named():
    with pytest.raises(ValueError, match=r"layers \[7\]"):
        attach(gpt(), FullConfig(layers=[7]))


def test_attach_twice_is_refused():
    m = attach(gpt(), FullConfig())
    with pytest.raises(ValueError, match="already"):
        attach(m, FullConfig())


def test_unregistered_config_is_refused():
    @dataclass
    class Nope(MethodConfig):
        def trainable(self, name):
            return True
    with pytest.raises(ValueError, match="not a registered"):
        attach(gpt(), Nope())


def test_config_training_nothing_is_refused():
    @dataclass
    class NothingConfig(MethodConfig):
        def trainable(self, name):
            return False
    register("nothing-test", NothingConfig, lr=1.0)(lambda model, config: None)
    try:
        with pytest.raises(ValueError, match="no parameter trainable"):
            attach(gpt(), NothingConfig())
    finally:
        METHODS.pop("nothing-test")


def test_no_method_attached_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="minilora.attach"):
        save_adapter(gpt(), tmp_path)
    with pytest.raises(ValueError, match="minilora.attach"):
        mark_trainable(gpt())


def test_full_adapter_roundtrip_and_config(tmp_path):
    m = attach(gpt(), FullConfig(layers=[0, 1]))
    with torch.no_grad():
        m.transformer.h[0].attn.c_attn.weight.add_(1.0)
    save_adapter(m, tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert raw["minilora_method"] == "full" and raw["layers"] == [0, 1]
    assert raw["base_shapes"]["n_embd"] == 32
    fresh = gpt()
    load_adapter(fresh, tmp_path)
    assert fresh.minilora_config == FullConfig(layers=[0, 1])
    assert torch.equal(fresh.transformer.h[0].attn.c_attn.weight, m.transformer.h[0].attn.c_attn.weight)


def test_unknown_method_in_adapter_file_is_named(tmp_path):
    save_adapter(attach(gpt(), FullConfig()), tmp_path)
    raw = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    raw["minilora_method"] = "telepathy"
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="telepathy"):
        load_adapter(gpt(), tmp_path)


def test_missing_adapter_dir_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=ADAPTER_CONFIG):
        load_adapter(gpt(), tmp_path / "nowhere")


def test_merge_and_unload_on_plain_method_is_harmless():
    m = attach(gpt(), FullConfig())
    x = torch.randint(0, 64, (1, 5))
    before = m(x)[0]
    minilora.merge_and_unload(m)
    assert m.minilora_config is None and torch.equal(m(x)[0], before)
    assert all(isinstance(mod, (nn.Module,)) for mod in m.modules())
