"""The command line as a user runs it: the main job, the other commands, and bad input."""
import json
import subprocess
import sys

import pytest
import torch

from minilora import METHODS
from minilora.cli import main, parse_opts
from minilora.settings import BASE_DIR, REPO_ROOT


def run(*args):
    return subprocess.run([sys.executable, "-m", "minilora", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env={"PATH": "", "MINILORA_QUICK": "1"})


def test_committed_base_exists():
    assert (BASE_DIR / "model.safetensors").is_file() and (BASE_DIR / "config.json").is_file()


def test_compare_quick_writes_table_json_and_plot(tmp_path):
    results = main(["compare", "--quick", "--methods", "full,qlora", "--steps", "3", "--no-progress",
                    "--out", str(tmp_path)])
    assert [r["method"] for r in results["rows"]] == ["full", "qlora"]
    full, qlora = results["rows"]
    # the share is of the base's parameters for every method, even when the base is quantized into buffers
    assert full["total_params"] == qlora["total_params"] == 1_334_016
    assert qlora["trainable_pct"] == 100 * qlora["trainable_params"] / 1_334_016
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["rows"][0]["trainable_params"] == results["rows"][0]["trainable_params"]
    table = (tmp_path / "compare.md").read_text()
    assert "| full |" in table and "test acc" in table
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_compare_update_replaces_and_adds_rows_and_refuses_other_settings(tmp_path, capsys):
    main(["compare", "--quick", "--methods", "full,lora", "--steps", "2", "--no-progress", "--out", str(tmp_path)])
    before = json.loads((tmp_path / "compare.json").read_text())
    results = main(["compare", "--quick", "--methods", "lora,prompt", "--steps", "2", "--no-progress",
                    "--out", str(tmp_path), "--update"])
    assert [r["method"] for r in results["rows"]] == ["full", "lora", "prompt"]
    assert results["rows"][0] == before["rows"][0]  # full's row kept as it was
    assert "; then " in results["command"]
    with pytest.raises(SystemExit):
        main(["compare", "--quick", "--methods", "lora", "--steps", "3", "--no-progress", "--out", str(tmp_path),
              "--update"])
    assert "rerun it whole" in capsys.readouterr().err


def test_finetune_saves_an_adapter_and_generate_uses_it(tmp_path):
    main(["finetune", "--method", "full", "--steps", "2", "--no-progress", "--out", str(tmp_path / "a")])
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
    text = main(["generate", "--prompt", "def f(a, b)\nlast parameter:", "--max-new-tokens", "3",
                 "--temperature", "0", "--adapter", str(tmp_path / "a")])
    assert text.startswith("def f(a, b)\nlast parameter:")


def test_help_lists_every_method_and_its_options():
    out = run("--help")
    assert out.returncode == 0
    for name, m in METHODS.items():
        assert name in out.stdout


@pytest.mark.parametrize("args, message", [
    (["compare", "--methods", "nope"], "unknown methods ['nope']"),
    (["finetune", "--method", "full", "--opt", "rank=3"], "full takes KEY=VALUE"),
    (["finetune", "--method", "full", "--model", "/nonexistent"], "no base model in /nonexistent"),
    (["compare", "--steps", "many"], "invalid int value"),
])
def test_bad_input_is_one_clear_line(args, message):
    out = run(*args)
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_parse_opts_types():
    cfg = parse_opts("full", ["layers=[0, 2]"])
    assert cfg.layers == [0, 2]


def test_readme_results_come_from_the_committed_files():
    from minilora.cli import BEGIN, END, README, results_markdown
    text = README.read_text()
    section = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert section == results_markdown(), "README results are stale: run `python -m minilora readme`"


def test_pretrain_is_bit_for_bit_deterministic(tmp_path):
    for out in ("a", "b"):
        main(["pretrain", "--steps", "2", "--batch-size", "16", "--no-progress", "--out", str(tmp_path / out)])
    a, b = (tmp_path / "a" / "model.safetensors").read_bytes(), (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b


def test_finetune_is_reproducible_including_the_methods_random_init():
    from minilora.cli import finetune
    from minilora.train import TrainConfig
    runs = [finetune("lora", train_cfg=TrainConfig(steps=2, eval_every=2, eval_examples=8, lr=1e-2, progress=False))
            for _ in range(2)]
    (m1, r1), (m2, r2) = runs
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
