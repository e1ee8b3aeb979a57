"""Smoke run of the QLoRA benchmark on CPU: it runs every method, prints, and writes the JSON it promises.
No timing is asserted."""
import json

import pytest
import torch

from minilora.bench import qlora as bench


def test_quick_cpu_run_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, even on a GPU machine
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "batch", "seq", "shapes", "weight_memory", "rows"} <= result.keys()
    assert result["command"] == f"python -m minilora.bench.qlora --quick --out {out}"
    assert result["versions"]["torch"] == torch.__version__ and (result["batch"], result["seq"]) == (2, 32)
    w = result["weight_memory"]["quick"]
    assert w["nf4_mb"] < w["bf16_mb"] / 3.8 and 4.126 < w["nf4_bits_per_param"] < 4.2  # small layers: more c1
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(bench.METHODS)
    for name, r in rows.items():
        if "skipped" in r:
            assert name == "peft_qlora" and not all(result["versions"][k] for k in ("bitsandbytes", "peft"))
            continue
        assert "error" not in r, r
        assert r["step_ms"] > 0 and r["peak_memory_mb"] is None and r["trainable_params"] > 0
    assert rows["qlora"]["trainable_params"] == rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    adapted = rows["full"]["total_params"] + rows["lora"]["trainable_params"]  # the base + A, B
    assert rows["qlora"]["total_params"] == rows["lora"]["total_params"] == adapted  # NF4 weights counted too
    assert rows["qlora"]["loss_last"] == rows["qlora_paged"]["loss_last"]  # PagedAdamW = AdamW on the CPU


def test_unknown_shape_is_named():
    with pytest.raises(SystemExit, match="unknown shapes"):
        bench.main(["--shapes", "huge", "--out", "/dev/null"])
