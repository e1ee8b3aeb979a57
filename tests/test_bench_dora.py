"""Smoke run of the DoRA benchmark on CPU: it runs, prints, and writes the JSON it promises. No timing asserted."""
import json

import torch

from minilora.bench import dora


def test_quick_cpu_run_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, even on a GPU machine
    out = tmp_path / "bench.json"
    dora.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "model", "targets", "rows", "ratios",
            "predicted_extra_saved_mib"} <= result.keys()
    assert result["command"] == f"python -m minilora.bench.dora --quick --out {out}"
    assert result["versions"]["torch"] == torch.__version__
    assert result["targets"] == {"time": 1.2, "memory": 1.1}
    impls = ["minilora"] + ["peft"] * bool(result["versions"]["peft"] and result["versions"]["transformers"])
    assert [(r["impl"], r["method"]) for r in result["rows"]] == [(i, m) for i in impls for m in ("lora", "dora")]
    for r in result["rows"]:
        assert {"trainable_params", "ms_median", "ms_min", "peak_mib", "saved_mib", "loss_first",
                "loss_last"} <= r.keys()
        assert r["ms_median"] > 0 and r["peak_mib"] is None  # no peak memory on CPU
        assert abs(r["loss_first"] - result["rows"][0]["loss_first"]) < 1e-2  # same weights, identity at init
    lora_row, dora_row = result["rows"][:2]
    assert dora_row["trainable_params"] - lora_row["trainable_params"] == 2 * 96  # m: d_out per adapted c_attn
    assert set(result["ratios"]) == set(impls)
    for q in result["ratios"].values():
        assert q["time"] > 0 and q["memory"] is None and q["saved_extra_mib"] > 0  # DoRA keeps z for ∂L/∂m


def test_predicted_extra_is_one_activation_per_adapted_layer():
    assert dora.predicted_extra_mib([2304] * 12, 8, 1024, torch.bfloat16) == 12 * 8 * 1024 * 2304 * 2 / 2**20
