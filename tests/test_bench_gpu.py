"""The GPU run's orchestration, on the CPU: its plan, its time caps (a real subprocess killed at its cap), the
summary it makes from fake step results and fake benchmark JSON, the files it writes, its refusal without CUDA,
and the README section made from a summary. Nothing here needs a GPU or runs a benchmark."""
import json
import sys

import pytest
import torch

from minilora.bench import gpu
from minilora.cli import results_markdown
from minilora.settings import REPO_ROOT

H200 = dict(name="NVIDIA H200", gpu="h200", memory_gib=139.8)


def test_plan_covers_every_benchmark_within_eight_minutes(tmp_path):
    steps = gpu.plan(tmp_path, "h200")
    assert sum(s.cap_s for s in steps) <= gpu.PLANNED_S == 480
    benches = {p.stem for p in (REPO_ROOT / "minilora" / "bench").glob("*.py")} - {"__init__", "gpu"}
    planned = {s.argv[1].removeprefix("minilora.bench.") for s in steps if s.file is not None}
    assert benches == planned, "a benchmark module that the GPU run does not run: add it to gpu.STEPS"
    assert [s.name for s in steps][0] == "cuda-tests" and len({s.name for s in steps}) == len(steps)
    assert {t.step for t in gpu.TARGETS} <= {s.name for s in steps}  # every target is read from a planned step
    for s in steps:
        if s.file is not None:
            assert s.file == tmp_path / f"{s.name}_h200.json" and s.argv[-2:] == ["--out", str(s.file)]
    speed_1b = next(s for s in steps if s.name == "speed-1b")
    assert speed_1b.command.startswith("python -m minilora.bench.speed --preset 1b "
                                       "--methods full,lora,dora,qlora,qdora")


def test_cuda_tests_are_the_files_with_a_cuda_marker():
    tests = gpu.plan("data/results", "h200")[0]
    assert tests.argv[:5] == ["-m", "pytest", "-q", "-k", "cuda"]
    files = tests.argv[5:]
    assert {"tests/test_bgmv.py", "tests/test_kernels.py", "tests/test_paged_adamw.py", "tests/test_qlora.py",
            "tests/test_serve.py", "tests/test_memory.py"} <= set(files)
    assert "tests/test_bench_gpu.py" not in files and all((REPO_ROOT / f).is_file() for f in files)


def test_slug_names_the_files():
    assert gpu.slug("NVIDIA H200") == "h200"
    assert gpu.slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"


def test_a_step_at_its_cap_is_timed_out_with_its_children_killed():
    # the child starts a grandchild that holds the output pipe; were it left alive, the wait for the pipe's end
    # would add 5 s
    code = ("import subprocess, sys, time; print('started', flush=True); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)")
    r = gpu.run_command(["-c", code], cap_s=1, echo=False)
    assert r["status"] == "timed out" and r["exit_code"] != 0
    assert 1 <= r["wall_s"] < 4 and "started" in r["tail"]


def test_a_step_that_ends_is_ok_or_failed():
    ok = gpu.run_command(["-c", "print('hello')"], cap_s=30, echo=False)
    assert (ok["status"], ok["exit_code"], ok["tail"]) == ("ok", 0, "hello\n")
    bad = gpu.run_command(["-c", "import sys; print('oops', file=sys.stderr); sys.exit(3)"], cap_s=30, echo=False)
    assert (bad["status"], bad["exit_code"], bad["tail"]) == ("failed", 3, "oops\n")


def test_count_tests_reads_pytest_closing_line():
    out = ("....FF.\nFAILED tests/test_memory.py::test_cuda_phases[False-full] - AssertionError: assert 1 <= 0\n"
           "11 failed, 25 passed, 300 deselected in 32.51s\n")
    assert gpu.count_tests(out) == {"failed": 11, "passed": 25, "deselected": 300,
                                    "failures": ["tests/test_memory.py::test_cuda_phases[False-full]"]}
    assert gpu.count_tests("1 error in 0.2s") == {"errors": 1}


def fake_results(steps) -> dict:
    """What the benchmarks would write (the rows the targets read, plus an error row) and the step results."""
    jsons = {
        "qlora": {"rows": [dict(shape="gpt2", method="full", step_ms=20.0),
                           dict(shape="gpt2", method="lora", step_ms=40.0),
                           dict(shape="gpt2", method="qlora", step_ms=44.0),
                           dict(shape="gpt2", method="qlora_paged", error="NameError()"),
                           dict(shape="gpt2", method="peft_qlora", step_ms=80.0)]},
        "dora": {"rows": [dict(impl="minilora", method="lora", peak_mib=100.0),
                          dict(impl="minilora", method="dora", peak_mib=128.0)]},
        "dequant": {"rows": [dict(shape=[8192, 28672], method="triton", double_quant=False, pct_copy_bw=95.0),
                             dict(shape=[8192, 28672], method="triton", double_quant=True, pct_copy_bw=68.4)]},
        "speed-gpt2": {"runs": [{"rows": [dict(impl="minilora", method="full", step_ms=30.0),
                                          dict(impl="minilora", method="lora", step_ms=21.0),
                                          dict(impl="minilora", method="adalora", skipped="step failed")]}]},
    }
    results = {}
    for s in steps:
        if s.name in jsons:
            s.file.write_text(json.dumps({"device": "NVIDIA H200", "versions": {"torch": "2.11.0+cu130"},
                                          "command": s.command, **jsons[s.name]}))
            results[s.name] = dict(status="ok", exit_code=0, wall_s=12.3, tail="")
    results["cuda-tests"] = dict(status="failed", exit_code=1, wall_s=33.0,
                                 tail="FAILED tests/test_x.py::test_cuda_a - E\n1 failed, 5 passed in 30.0s\n")
    results["serve"] = dict(status="timed out", exit_code=-9, wall_s=70.1, tail="building PEFT...\n")
    return results  # speed-1b: not run


def test_summary_of_passed_failed_timed_out_and_missed_targets(tmp_path, capsys):
    steps = gpu.plan(tmp_path, "h200")
    summary = gpu.summarize(steps, fake_results(steps), H200, "python -m minilora.bench.gpu")
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"cuda-tests": "failed", "dequant": "ok", "dora": "ok", "qlora": "ok", "serve": "timed out",
                      "speed-gpt2": "ok", "speed-1b": "not run"}
    steps_by_name = {s["name"]: s for s in summary["steps"]}
    assert steps_by_name["cuda-tests"]["tests"] == {"failed": 1, "passed": 5,
                                                    "failures": ["tests/test_x.py::test_cuda_a"]}
    assert steps_by_name["serve"]["file"] is None and steps_by_name["serve"]["log_tail"] == ["building PEFT..."]
    assert steps_by_name["dora"]["file"] == "dora_h200.json" and "log_tail" not in steps_by_name["dora"]
    assert summary["caps_s"] == sum(s.cap_s for s in steps if s.name != "speed-1b")
    got = {t["figure"]: (t["value"], t["verdict"]) for t in summary["targets"]}
    assert got["QLoRA / LoRA step, gpt2"] == (pytest.approx(1.1), "met")
    assert got["minilora QLoRA / PEFT+bnb QLoRA step, gpt2"] == (pytest.approx(0.55), "met")
    assert got["QLoRA / LoRA step, 1.3b"] == (None, "no data")  # no 1.3b rows
    assert got["DoRA / LoRA peak memory, gpt2"] == (pytest.approx(1.28), "missed")  # over its target of 1.1
    assert got["Triton NF4+DQ dequant 8192x28672, % of copy bandwidth"] == (68.4, "missed")  # under its 90
    assert got["LoRA / full FT step, gpt2"] == (pytest.approx(0.7), "met")
    assert got["AdaLoRA / LoRA step, gpt2"] == (None, "no data")  # a skipped row has no step time
    assert got["tokens/s at 100 adapters / at 1 (server-torch)"] == (None, "no data")  # timed out: no JSON
    assert got["QDoRA / PEFT+bnb DoRA step, 1b"] == (None, "no data")  # not run
    gpu.print_summary(summary)  # every kind of row prints
    printed = capsys.readouterr().out
    assert "cuda-tests: FAILED tests/test_x.py::test_cuda_a" in printed and "speed-1b    not run" in printed


def test_main_writes_each_json_and_the_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu, "cuda_device", lambda: H200)  # the seam: a GPU, as far as main can tell
    (tmp_path / "dora_h200.json").write_text('{"stale": true}')  # an earlier run's, removed before the step
    calls = []

    def fake_run(argv, cap_s, echo=True):  # a benchmark that writes its JSON where --out says
        calls.append((argv, cap_s))
        out = REPO_ROOT / argv[argv.index("--out") + 1]
        assert not out.exists()
        out.write_text(json.dumps({"device": "NVIDIA H200", "versions": {"torch": torch.__version__},
                                   "command": gpu.shlex.join(["python", *argv]), "rows": []}))
        return dict(status="ok", exit_code=0, wall_s=1.0, tail="")

    monkeypatch.setattr(gpu, "run_command", fake_run)
    assert gpu.main(["--only", "dora,speed", "--out", str(tmp_path)]) == 0
    assert [a[1] for a, _ in calls] == ["minilora.bench.dora", "minilora.bench.speed", "minilora.bench.speed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dora_h200.json", "gpu_h200.json", "speed-1b_h200.json",
                                                          "speed-gpt2_h200.json"]
    dora = json.loads((tmp_path / "dora_h200.json").read_text())
    assert dora["command"] == f"python -m minilora.bench.dora --out {tmp_path / 'dora_h200.json'}"
    summary = json.loads((tmp_path / "gpu_h200.json").read_text())
    assert summary["device"] == "NVIDIA H200" and summary["versions"]["torch"] == torch.__version__
    assert summary["command"] == f"python -m minilora.bench.gpu --only dora,speed --out {tmp_path}"
    assert [s["status"] for s in summary["steps"]].count("ok") == 3
    assert "speed-1b" in capsys.readouterr().out


def test_a_failed_step_fails_the_run_but_a_missed_target_does_not(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "cuda_device", lambda: H200)
    monkeypatch.setattr(gpu, "run_command", lambda argv, cap_s, echo=True: dict(status="timed out", exit_code=-9,
                                                                                wall_s=cap_s, tail=""))
    assert gpu.main(["--only", "serve", "--out", str(tmp_path)]) == 1


def test_refuses_without_cuda_unless_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu, "run_command", lambda *a, **k: pytest.fail("ran a step without CUDA"))
    with pytest.raises(SystemExit) as e:
        gpu.main(["--out", str(tmp_path)])
    assert e.value.code != 0 and "no CUDA device" in str(e.value) and "--dry-run" in str(e.value)
    assert gpu.main(["--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "caps 475 s" in out and "python -m minilora.bench.serve --out" in out and "cap  60 s" in out
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SystemExit):
        gpu.main(["--dry-run", "--only", "nope"])


def test_readme_renders_a_gpu_summary(tmp_path):
    steps = gpu.plan(tmp_path, "h200")
    summary = gpu.summarize(steps, fake_results(steps), H200, "python -m minilora.bench.gpu")
    (tmp_path / "gpu_h200.json").write_text(json.dumps(summary))
    text = results_markdown(tmp_path)
    assert text.startswith(f"### `python -m minilora.bench.gpu` on NVIDIA H200 (torch {torch.__version__}, CUDA ")
    assert "File: `data/results/gpu_h200.json`" in text
    assert "| cuda-tests | failed (1 failed, 5 passed) | 33 | 60 |" in text
    serve = "| serve | timed out | 70 | 70 | tokens/s at 100 adapters / at 1 (server-torch) | — | ≥ 0.85 | no data |"
    assert serve in text
    assert "| DoRA / LoRA peak memory, gpt2 | 1.28 | ≤ 1.1 | missed |" in text
    assert "- speed-1b: `python -m minilora.bench.speed --preset 1b" in text
    assert text.count("### ") == 1  # the summary only: the benchmarks' own JSON are not dumped as tables
    assert results_markdown(tmp_path / "nothing") == ""  # no files, no section

