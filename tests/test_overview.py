"""The numbers lessons/00-overview.md works out by hand."""
import torch

from minilora import GPT, PRESETS, FullConfig, attach


def test_tiny_parameter_count():
    assert GPT(PRESETS["tiny"]).num_params() == 1_334_016
    assert sum(p.numel() for p in GPT(PRESETS["tiny"]).transformer.h[0].parameters()) == 198_272


def test_small_parameter_count():
    with torch.device("meta"):
        assert GPT(PRESETS["small"]).num_params() == 12_318_720


def test_top_block_only():
    m = attach(GPT(PRESETS["tiny"]), FullConfig(layers=[3]))
    assert m.num_params(trainable_only=True) == 198_272


def test_full_finetuning_bytes_per_param():
    # fp32 AdamW: weight 4 + grad 4 + exp_avg 4 + exp_avg_sq 4
    assert 1_334_016 * 16 / 2**20 == 20.35546875
