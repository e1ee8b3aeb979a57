"""Smoke run of the dequant benchmark on CPU: it runs, prints, and writes the JSON it promises. No timing asserted."""
import json

import torch

from minilora.bench import dequant


def test_quick_cpu_run_writes_json(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, even on a GPU machine
    out = tmp_path / "bench.json"
    dequant.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "copy_gbps", "rows"} <= result.keys()
    assert result["command"] == f"python -m minilora.bench.dequant --quick --out {out}"
    assert result["versions"]["torch"] == torch.__version__
    methods = {r["method"] for r in result["rows"]}
    assert "reference_eager" in methods
    if result["versions"]["bitsandbytes"]:
        bnb_rows = {r["double_quant"] for r in result["rows"] if r["method"] == "bitsandbytes"}
        assert bnb_rows == {True, False}
    for r in result["rows"]:
        assert "error" not in r, r
        assert {"shape", "dtype", "us_median", "us_min", "bytes", "bytes_per_param", "gbps", "pct_copy_bw"} <= r.keys()
        assert r["us_median"] > 0 and r["bit_identical_to_reference"]  # on CPU bitsandbytes equals us too
        if r["double_quant"] and r["method"] != "bitsandbytes":  # 0.5 + 2 + 1/64 + 4/(64·256) + small tables
            assert 2.515 < r["bytes_per_param"] < 2.7


def test_bytes_moved_is_the_analytic_minimum():
    w = torch.randn(256, 1024).bfloat16()
    q = dequant.quantize_nf4(w)
    stored = [q.packed, q.absmax, q.absmax_scale, q.absmax_offset]
    per_param = dequant.bytes_moved(stored, w.numel(), torch.bfloat16) / w.numel()
    assert abs(per_param - (0.5 + 2 + 1 / 64 + 4 / (64 * 256) + 4 / w.numel())) < 1e-12


def test_parse_shapes():
    assert dequant.parse_shapes("4096x4096,8x16") == [(4096, 4096), (8, 16)]
