"""Smoke run of the speed benchmark on CPU: it steps every registered method, splits each step into its phases,
compares with PEFT on the same shapes, and writes the JSON it promises. No timing is asserted, only that times
exist, are positive and add up."""
import dataclasses
import json

import pytest
import torch

from minilora import METHODS, MethodConfig
from minilora.attach import Method
from minilora.bench import speed


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, even on a GPU machine


def _peft_installed() -> bool:
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except Exception:
        return False
    return True


def test_quick_cpu_run_writes_json(tmp_path, cpu_only):
    out = tmp_path / "bench.json"
    speed.main(["--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    assert {"device", "versions", "command", "autocast", "memory_kind", "targets", "runs"} <= result.keys()
    assert result["command"] == f"python -m minilora.bench.speed --quick --out {out}"
    assert result["versions"]["torch"] == torch.__version__ and result["autocast"] == "none"
    assert result["memory_kind"].startswith("cpu: tensor bytes") and result["interleave"] is True
    (run,) = result["runs"]
    assert run["preset"] == "quick" and (run["batch"], run["seq"]) == (2, 16)
    assert {"rows", "targets", "predicted_lora_over_full", "inference", "params"} <= run.keys()
    ours = [r for r in run["rows"] if r["impl"] == "minilora"]
    assert [r["method"] for r in ours] == list(METHODS)  # every registered method: measured, or skipped with why
    measured = {(r["impl"], r["method"]): r for r in run["rows"] if "skipped" not in r}
    assert ("minilora", "full") in measured and ("minilora", "lora") in measured
    for key, r in measured.items():
        assert len(r["steps_ms"]) == result["iters"] == 3, key
        assert all(t > 0 for step in r["steps_ms"] for t in step), key  # every phase of every step took time
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["trainable_params"] > 0, key
        m = r["memory_mib"]
        assert m["weights"] > 0 and m["activations"] > 0 and m["grads"] > 0 and m["optimizer"] > 0, key
        assert m["total"] == pytest.approx(m["weights"] + m["grads"] + m["optimizer"] + m["activations"])
    assert measured["minilora", "full"]["trainable_params"] == run["params"]
    assert measured["minilora", "lora"]["memory_mib"]["grads"] < measured["minilora", "full"]["memory_mib"]["grads"]
    assert set(run["targets"]) == {"lora_vs_full", "lora_vs_peft_lora", "dora_vs_peft_dora"}
    assert run["targets"]["lora_vs_full"]["ratio"] > 0 and run["targets"]["lora_vs_full"]["target"] == 0.85
    assert 0 < run["predicted_lora_over_full"] < 1
    skipped_4bit = [r for r in run["rows"] if r["impl"] == "peft+bnb4"]
    if _peft_installed():
        assert {("peft", "lora"), ("peft", "dora")} <= measured.keys()
        assert all("CUDA only" in r["skipped"] for r in skipped_4bit) and len(skipped_4bit) == 2
        assert run["targets"]["lora_vs_peft_lora"]["passed"] in (True, False)
    else:
        assert run["targets"]["lora_vs_peft_lora"]["passed"] is None


def test_phases_sum_to_the_step(tmp_path, cpu_only):
    """The reported times are the medians of the recorded steps, and the phases' medians add up to about the
    step's median. The tiny preset's steps (tens of ms) are long next to a scheduler's time slice, so other
    jobs on the machine slow every step alike and the medians stay consistent."""
    result = speed.main(["--preset", "tiny", "--batch", "2", "--seq", "32", "--no-peft", "--methods", "full,lora",
                         "--warmup", "1", "--iters", "5", "--infer-iters", "1", "--out", str(tmp_path / "b.json")])
    for r in result["runs"][0]["rows"]:
        steps = [sum(s) for s in r["steps_ms"]]
        assert r["step_ms"] == sorted(steps)[2] and r["step_ms_min"] == min(steps)
        for i, phase in enumerate(speed.PHASES):
            assert r[f"{phase}_ms"] == sorted(s[i] for s in r["steps_ms"])[2]
        phases = r["forward_ms"] + r["backward_ms"] + r["optimizer_ms"]
        assert phases == pytest.approx(r["step_ms"], rel=0.25), r["steps_ms"]  # medians of parts vs of sums


def test_peft_rows_have_minilora_lora_shapes(tmp_path, cpu_only):
    """PEFT's LoRA and DoRA train as many parameters as minilora's (same rank, same targets), also when
    --r and --targets change them, and start from the same loss (the same weights, identity at init)."""
    if not _peft_installed():
        pytest.skip("peft/transformers not installed")
    result = speed.main(["--quick", "--methods", "lora,dora", "--r", "4", "--targets", "all-linear", "--iters", "1",
                         "--out", str(tmp_path / "b.json")])
    rows = {(r["impl"], r["method"]): r for r in result["runs"][0]["rows"] if "skipped" not in r}
    C, L = 32, 2
    assert rows["minilora", "lora"]["trainable_params"] == L * 4 * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    for method in ("lora", "dora"):
        ours, theirs = rows["minilora", method], rows["peft", method]
        assert ours["trainable_params"] == theirs["trainable_params"], method
        assert ours["loss_first"] == pytest.approx(theirs["loss_first"], abs=1e-4), method


def test_merged_inference_equals_unmerged(tmp_path, cpu_only):
    result = speed.main(["--quick", "--no-peft", "--methods", "lora", "--out", str(tmp_path / "b.json")])
    inf = result["runs"][0]["inference"]
    modes = {(r["method"], r["mode"]): r for r in inf["rows"]}
    assert {("base", "plain GPT"), ("lora", "unmerged"), ("lora", "merged"), ("dora", "unmerged"),
            ("dora", "merged"), ("dora", "served, f cached (serve.LoRAServer)"),
            ("dora", "norms alone: every layer's f")} == modes.keys()
    for r in inf["rows"]:
        assert "error" not in r and r["ms_median"] > 0 and r["ms_min"] > 0, r
        if r["mode"] in ("merged", "served, f cached (serve.LoRAServer)"):
            assert r["max_abs_diff"] < 1e-4, r  # same logits: merging (and caching f) is exact


@dataclasses.dataclass
class _BrokenConfig(MethodConfig):
    def trainable(self, name):
        return True


def _broken_apply(model, config):
    raise ValueError("needs a wider model")


def test_a_method_that_fails_to_attach_is_skipped_with_its_reason(tmp_path, cpu_only, monkeypatch, capsys):
    monkeypatch.setitem(METHODS, "broken", Method("broken", _BrokenConfig, _broken_apply, lr=1e-3))
    result = speed.main(["--quick", "--no-peft", "--methods", "full,broken", "--iters", "1", "--no-interleave",
                         "--out", str(tmp_path / "b.json")])  # one model after another, as on a GPU
    rows = {r["method"]: r for r in result["runs"][0]["rows"]}
    assert "skipped" not in rows["full"]
    assert "attach failed" in rows["broken"]["skipped"] and "needs a wider model" in rows["broken"]["skipped"]
    assert "skipped minilora broken: attach failed" in capsys.readouterr().out


def test_unknown_preset_or_method_is_named():
    with pytest.raises(SystemExit, match="unknown presets/methods"):
        speed.main(["--preset", "huge", "--out", "/dev/null"])
    with pytest.raises(SystemExit, match="--modules"):
        speed.main(["--methods", "nosuch", "--out", "/dev/null"])


def test_step_flops_by_hand():
    """One layer, C 2, V 3, one token: linears 2·(2·6 + 2·2 + 2·8 + 8·2) = 96, attention 4·1·1·2 = 8,
    head 2·2·3 = 12."""
    cfg = speed.GPTConfig(n_layer=1, n_head=1, n_embd=2, vocab_size=3, block_size=4)
    assert speed.step_flops(cfg, 1, 1, "full") == {"forward": 116, "backward": 232}  # ∂L/∂x and ∂L/∂W: 2x
    lora = speed.step_flops(cfg, 1, 1, "lora", r=1, targets=("c_attn",))  # + A, B on c_attn: 2·1·(2 + 6) = 16
    assert lora == {"forward": 116 + 16, "backward": 96 + 2 * 8 + 12 + 2 * 16}  # ∂L/∂x only through W0 and the head


def test_predicted_ratio_is_about_two_thirds_for_gpt2():
    """Big linears dominate GPT-2 124M at T = 512: LoRA skips ∂L/∂W, a third of each linear's step."""
    cfg, B, T = speed.SHAPES["gpt2"]
    assert 0.64 < speed.predicted_ratio(cfg, B, T, 8, "c_attn") < 0.72
