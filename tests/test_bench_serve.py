"""Smoke runs of the serving benchmark on CPU: it runs, every method gives the server's logits, and it writes the
JSON it promises. No timing asserted."""
import json

import pytest
import torch

from minilora.bench import serve


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, even on a GPU machine


def test_quick_cpu_run_writes_json(tmp_path, cpu_only):
    out = tmp_path / "bench.json"
    serve.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "model", "rows", "stream", "pool_mib"} <= result.keys()
    assert result["command"] == f"python -m minilora.bench.serve --quick --out {out}"
    assert result["versions"]["torch"] == torch.__version__
    methods = ["server-torch", "merge-switch", "loop-adapter_rows"]  # no kernel on CPU, no PEFT with --quick
    assert [(r["adapters"], r["method"]) for r in result["rows"]] == [(k, m) for k in (1, 2, 4, 8) for m in methods]
    for r in result["rows"]:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["max_abs_diff"] < 1e-4, r  # all methods compute the same logits
    cold = [r["cold_misses"] for r in result["rows"] if r["method"] == "server-torch"]
    assert cold == [1, 1, 2, 4]  # each count pages in only the adapters the previous batches did not
    for s in result["stream"]:
        assert 0 <= s["hit_rate"] <= 1 and s["misses"] >= 1 and s["transfer_mib"] > 0, s
    assert [s["n_slots"] for s in result["stream"]] == [4, 8]
    assert result["stream"][-1]["misses"] <= result["stream"][0]["misses"]  # a larger LRU pool never misses more


def test_merge_switch_equals_the_server_and_restores_the_base():
    base = serve.GPT(serve.QUICK_CPU).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    zoo, names = serve.make_zoo(base, 3, [2, 4], ["c_attn", "c_fc"])
    server = serve.LoRAServer(base, n_slots=3, max_rank=4)
    for name, ad in serve.extract(zoo).items():
        server.add(name, ad)
    factors = {n: {m: (mod.lora_B[n].weight, mod.lora_A[n].weight, mod.scaling[n])
                   for m, mod in zoo.named_modules() if isinstance(mod, serve.LoRALinear)} for n in names}
    idx = torch.randint(0, 64, (5, 6))
    rows = ["a2", "a0", "a2", "a1", "a0"]
    torch.testing.assert_close(serve.merge_switch(base, factors, idx, rows), server.forward(idx, rows),
                               atol=1e-5, rtol=0)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_peft_rows_agree(tmp_path, cpu_only):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    result = serve.main(["--quick", "--peft", "--counts", "1,4", "--iters", "1", "--warmup", "0",
                         "--stream-batches", "1", "--out", str(tmp_path / "b.json")])
    peft_rows = [r for r in result["rows"] if r["method"] == "peft-adapter_names"]
    assert [r["adapters"] for r in peft_rows] == [1, 4]
    assert all("error" not in r and r["max_abs_diff"] < 1e-4 for r in peft_rows), peft_rows


def test_gpu_default_is_the_size_one_gpu_run_affords(monkeypatch):
    """bench.gpu caps this benchmark at 70 s: the GPU default stops at 100 adapters with 5 timed calls (53 s on one
    H200); 1,000 adapters is a choice of --counts. CPU and --quick keep their repeats."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    preset, batch, _, counts, _, _ = serve.DEFAULTS["cuda"]
    assert (preset, batch, counts) == ("gpt2", 256, "1,16,100")
    args = serve.parse_args([])
    assert (args.warmup, args.iters, args.peft) == (1, 5, True)
    assert (serve.parse_args(["--quick"]).iters, serve.parse_args(["--cpu"]).iters) == (2, 10)
    big = serve.parse_args(["--counts", "1,16,100,1000", "--batch", "1024"])
    assert (big.counts, big.batch) == ("1,16,100,1000", 1024)
