"""One command for a GPU machine: the CUDA tests and every benchmark at its GPU defaults, each under a time cap,
then one table of what ran and of each headline ratio against its target.

    python -m minilora.bench.gpu                         # CUDA: 5-6 minutes on one H200, 8 at most
    python -m minilora.bench.gpu --dry-run               # the plan: every command and its cap; runs nothing
    python -m minilora.bench.gpu --only dora,serve --out runs/gpu

Each step (STEPS) is a subprocess in its own process group, run from the repository's root; at its cap the
whole group is killed and the step reads 'timed out', and the next step runs. The caps sum to at most 8 minutes
(PLANNED_S); each is 1.3-1.7x what the step took on one H200 (torch 2.11.0+cu130, commit b61f619), dequant's
more: its default also compiles, which that run left out.
Files, in --out (default data/results/), with <gpu> a slug of the device's name (NVIDIA H200 -> h200):
    <step>_<gpu>.json   a benchmark's own JSON: device, versions, command, rows (removed first, so a step that
                        fails leaves none rather than an older run's)
    gpu_<gpu>.json      the summary: device, versions, command, each step's result and wall time, each figure
                        of TARGETS against its target. `python -m minilora readme` puts it in the README.
Targets are reported, never asserted: a missed one does not change the exit code; a failed or capped step does.
"""
from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minilora.bench import write_result
from minilora.settings import DATA_DIR, REPO_ROOT

PLANNED_S = 480  # the caps' sum may not exceed this: one run fits 8 minutes of a borrowed GPU
TESTS = "cuda-tests"
# (step, what `python -m` runs, its arguments, cap s); the comment: seconds it took on one H200 (see above)
STEPS = [
    (TESTS, "pytest", ["-q", "-k", "cuda"], 60),  # 35 s; the files: cuda_test_files()
    ("dequant", "minilora.bench.dequant", [], 55),  # 15 s with --no-compile --iters 20; the default also compiles
    ("dora", "minilora.bench.dora", [], 40),  # 29 s
    ("qlora", "minilora.bench.qlora", [], 70),  # 49 s
    ("serve", "minilora.bench.serve", [], 70),  # 53 s (its GPU default since; 1,000 adapters did not end in 70 s)
    ("speed-gpt2", "minilora.bench.speed", ["--preset", "gpt2"], 90),  # 62 s
    ("speed-1b", "minilora.bench.speed", ["--preset", "1b", "--methods", "full,lora,dora,qlora,qdora",
                                          "--iters", "5", "--infer-iters", "10"], 90),  # 64 s
]


@dataclass(frozen=True)
class Target:
    """figure = row(num)[field] / row(den)[field] (den None: the value itself), in the JSON of `step`; a row
    is the first whose items include the match and that has the field (an error or skipped row has none)."""
    step: str
    figure: str
    num: dict
    den: dict | None
    field: str
    op: str  # "<=" or ">="
    limit: float


# The issues' targets: the one place they are written.
TARGETS = [
    Target("qlora", "QLoRA / LoRA step, gpt2", {"shape": "gpt2", "method": "qlora"},
           {"shape": "gpt2", "method": "lora"}, "step_ms", "<=", 1.15),
    Target("qlora", "QLoRA / LoRA step, 1.3b", {"shape": "1.3b", "method": "qlora"},
           {"shape": "1.3b", "method": "lora"}, "step_ms", "<=", 1.15),
    Target("qlora", "minilora QLoRA / PEFT+bnb QLoRA step, gpt2", {"shape": "gpt2", "method": "qlora"},
           {"shape": "gpt2", "method": "peft_qlora"}, "step_ms", "<=", 0.75),
    Target("qlora", "minilora QLoRA / PEFT+bnb QLoRA step, 1.3b", {"shape": "1.3b", "method": "qlora"},
           {"shape": "1.3b", "method": "peft_qlora"}, "step_ms", "<=", 0.75),
    Target("speed-gpt2", "LoRA / full FT step, gpt2", {"impl": "minilora", "method": "lora"},
           {"impl": "minilora", "method": "full"}, "step_ms", "<=", 0.8),
    Target("speed-gpt2", "AdaLoRA / LoRA step, gpt2", {"impl": "minilora", "method": "adalora"},
           {"impl": "minilora", "method": "lora"}, "step_ms", "<=", 1.3),
    Target("speed-1b", "QDoRA / PEFT+bnb DoRA step, 1b", {"impl": "minilora", "method": "qdora"},
           {"impl": "peft+bnb4", "method": "dora"}, "step_ms", "<=", 0.9),
    Target("dora", "DoRA / LoRA peak memory, gpt2", {"impl": "minilora", "method": "dora"},
           {"impl": "minilora", "method": "lora"}, "peak_mib", "<=", 1.1),
    Target("dequant", "Triton NF4+DQ dequant 8192x28672, % of copy bandwidth",
           {"shape": [8192, 28672], "method": "triton", "double_quant": True}, None, "pct_copy_bw", ">=", 90),
    Target("serve", "tokens/s at 100 adapters / at 1 (server-torch)", {"adapters": 100, "method": "server-torch"},
           {"adapters": 1, "method": "server-torch"}, "tokens_per_s", ">=", 0.85),
]


@dataclass(frozen=True)
class Step:
    name: str
    argv: list  # after `python`
    cap_s: int
    file: Path | None  # the benchmark's JSON; None for the tests

    @property
    def command(self) -> str:
        return shlex.join(["python", *self.argv])


def slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3': the <gpu> of the file names."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower().replace("nvidia", "")).strip("-") or "gpu"


def cuda_test_files(tests_dir=REPO_ROOT / "tests") -> list:
    """The test files with a `skipif(not torch.cuda.is_available(), ...)` marker, relative to the repository."""
    marker = re.compile(r"skipif\(\s*not torch\.cuda\.is_available\(\)")
    return [_shown(p) for p in sorted(Path(tests_dir).glob("test_*.py")) if marker.search(p.read_text())]


def _shown(path: Path) -> str:
    """A path as a command shows it: relative to the repository's root (where the steps run) when inside it."""
    path = Path(path).absolute()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def plan(out_dir, gpu: str) -> list:
    """STEPS as commands: each benchmark writes OUT/<step>_<gpu>.json; the tests step runs the CUDA test files."""
    steps = []
    for name, module, args, cap in STEPS:
        if name == TESTS:
            steps.append(Step(name, ["-m", module, *args, *cuda_test_files()], cap, None))
            continue
        file = Path(out_dir) / f"{name}_{gpu}.json"
        steps.append(Step(name, ["-m", module, *args, "--out", _shown(file)], cap, file))
    return steps


# ------------------------------------------------------------------------------ running a step
def run_command(argv: list, cap_s: float, echo: bool = True) -> dict:
    """Run `python *argv` from the repository's root, in a new session, for at most cap_s seconds. Returns
    status ('ok', 'failed' or 'timed out': then its whole process group, compile workers too, is killed),
    exit_code, wall_s and the output's last lines (stdout and stderr together, echoed as they come)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    tail = collections.deque(maxlen=60)

    def pump():
        for line in proc.stdout:
            tail.append(line)
            if echo:
                print(line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=cap_s)
        status = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this Popen started, and only it
        except ProcessLookupError:  # ended between the timeout and the kill
            pass
        code, status = proc.wait(), "timed out"
    reader.join(timeout=5)  # the pipe closes when the last process holding it has gone
    return dict(status=status, exit_code=code, wall_s=round(time.perf_counter() - t0, 1), tail="".join(tail))


def count_tests(output: str) -> dict:
    """pytest's closing line, '11 failed, 25 passed, 3 deselected in 32.1s' -> {'failed': 11, 'passed': 25, ...},
    and the ids of the failures."""
    counts = {}
    for line in output.splitlines():
        if re.search(r"\d+ (passed|failed|errors?|skipped|deselected)\b", line):
            counts = {("errors" if k == "error" else k): int(n)
                      for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", line)}
    failures = [line.split(" - ")[0].split(" ", 1)[1] for line in output.splitlines()
                if line.startswith(("FAILED ", "ERROR "))]
    return {**counts, **({"failures": failures} if failures else {})}


# ------------------------------------------------------------------------------ the summary
def rows_of(result: dict) -> list:
    """A benchmark's rows: result['rows'], or bench.speed's rows of every preset it ran."""
    return result.get("rows") or [r for run in result.get("runs", []) for r in run["rows"]]


def find_row(rows: list, match: dict, field: str):
    for r in rows:
        if r.get(field) is not None and all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def check(target: Target, result: dict | None) -> dict:
    """The figure in a benchmark's JSON (None: no JSON, or a row missing) and its verdict against the target."""
    value = None
    if result is not None:
        rows = rows_of(result)
        num = find_row(rows, target.num, target.field)
        den = find_row(rows, target.den, target.field) if target.den is not None else None
        if num is not None and (target.den is None or den is not None):
            value = num[target.field] / den[target.field] if den is not None else num[target.field]
    met = None if value is None else value <= target.limit if target.op == "<=" else value >= target.limit
    return dict(step=target.step, figure=target.figure, value=value, op=target.op, target=target.limit,
                verdict="no data" if met is None else "met" if met else "missed")


def summarize(steps: list, results: dict, device: dict, command: str) -> dict:
    """results: step name -> run_command's dict, for the steps that ran (the others read 'not run')."""
    rows, benches = [], {}
    for s in steps:
        r = results.get(s.name)
        wrote = r is not None and s.file is not None and s.file.is_file()  # main removed an earlier run's first
        row = dict(name=s.name, command=s.command, cap_s=s.cap_s, status="not run" if r is None else r["status"],
                   exit_code=None if r is None else r["exit_code"], wall_s=None if r is None else r["wall_s"],
                   file=s.file.name if wrote else None)
        if wrote:
            benches[s.name] = json.loads(s.file.read_text())
        if r is not None and s.name == TESTS:
            row["tests"] = count_tests(r["tail"])
        if r is not None and r["status"] != "ok":
            row["log_tail"] = r["tail"].splitlines()[-15:]
        rows.append(row)
    ran = [r["wall_s"] for r in rows if r["wall_s"] is not None]
    return {"device": device["name"], "gpu": device["gpu"], "memory_gib": device.get("memory_gib"),
            "versions": _versions(), "command": command, "date": time.strftime("%Y-%m-%d"),
            "caps_s": sum(s.cap_s for s in steps if s.name in results), "wall_s": round(sum(ran), 1),
            "steps": rows, "targets": [check(t, benches.get(t.step)) for t in TARGETS]}


def _versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in ("triton", "bitsandbytes", "transformers", "peft"):  # from the metadata: importing takes seconds
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _result(step: dict) -> str:
    t = step.get("tests")
    if t is None:
        return step["status"]
    counts = ", ".join(f"{t[k]} {k}" for k in ("failed", "errors", "passed", "skipped") if t.get(k))
    return f"{step['status']} ({counts})" if counts else step["status"]


def _table(summary: dict) -> list:
    """One row per (step, figure): step, result, wall s, cap s, figure, measured, target, verdict."""
    sign = {"<=": "≤", ">=": "≥"}
    out = []
    for step in summary["steps"]:
        figures = [t for t in summary["targets"] if t["step"] == step["name"]] or [None]
        for i, t in enumerate(figures):
            cells = [step["name"], _result(step), "" if step["wall_s"] is None else f"{step['wall_s']:.0f}",
                     str(step["cap_s"])] if i == 0 else [""] * 4
            if t is not None:
                cells += [t["figure"], "—" if t["value"] is None else f"{t['value']:.3g}",
                          f"{sign[t['op']]} {t['target']:g}", t["verdict"]]
            out.append(cells + [""] * (8 - len(cells)))
    return out


def print_summary(summary: dict) -> None:
    print(f"\n{summary['device']}  torch {summary['versions']['torch']}  CUDA {summary['versions']['cuda']}  "
          f"{summary['wall_s']:.0f} s (caps {summary['caps_s']} s)")
    head = ["step", "result", "wall s", "cap s", "figure", "measured", "target", "verdict"]
    rows = _table(summary)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.rjust(w) if i in (2, 3, 5) else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    for step in summary["steps"]:
        for failure in step.get("tests", {}).get("failures", []):
            print(f"  {step['name']}: FAILED {failure}")


def summary_markdown(summary: dict, file_name: str) -> str:
    """The README's section for one summary (cli.results_markdown calls it for data/results/gpu_*.json)."""
    v = summary["versions"]
    others = ", ".join(f"{k} {v[k]}" for k in ("triton", "bitsandbytes", "transformers", "peft") if v.get(k))
    lines = [f"### `python -m minilora.bench.gpu` on {summary['device']} (torch {v['torch']}, CUDA {v['cuda']})", "",
             f"Command: `{summary['command']}`, {summary['date']}; {summary['wall_s']:.0f} s in all (caps "
             f"{summary['caps_s']} s); {others}. File: `data/results/{file_name}`, each benchmark's JSON beside it.",
             "", "| step | result | wall (s) | cap (s) | figure | measured | target | |",
             "|---|---|---:|---:|---|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in _table(summary)]
    lines += ["", "Commands:", ""] + [f"- {s['name']}: `{s['command']}`" for s in summary["steps"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the command
def _alias(module: str) -> str:
    return module.rsplit(".", 1)[-1]  # minilora.bench.speed -> speed: --only speed picks both of its steps


def cuda_device() -> dict | None:
    """The GPU this run measures, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    name, memory = torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory
    return dict(name=name, gpu=slug(name), memory_gib=round(memory / 2**30, 1))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m minilora.bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan (commands and caps) and run nothing")
    p.add_argument("--only", type=lambda s: s.split(","),
                   help=f"comma-separated steps of {[s[0] for s in STEPS]}, or a module's name (speed: both)")
    p.add_argument("--out", default=str(DATA_DIR / "results"), help="where the JSON go (default data/results/)")
    args = p.parse_args(argv)
    names = {s[0] for s in STEPS} | {_alias(s[1]) for s in STEPS if s[0] != TESTS}
    if args.only and set(args.only) - names:
        p.error(f"--only {','.join(args.only)}: unknown {sorted(set(args.only) - names)}; pick from {sorted(names)}")
    device = cuda_device()
    if device is None and not args.dry_run:
        raise SystemExit(f"no CUDA device: torch {torch.__version__} sees no GPU here, and every step of this command "
                         "needs one. Run it on a machine with an NVIDIA GPU and a CUDA build of torch, or add "
                         "--dry-run to print the plan.")
    gpu = device["gpu"] if device else "GPU"
    steps = plan(args.out, gpu)
    chosen = [s for s in steps if not args.only or s.name in args.only or s.file and _alias(s.argv[1]) in args.only]
    where = device["name"] if device else "no CUDA device here: GPU stands for the device's slug, h200 on an H200"
    print(f"plan ({where}): {len(chosen)} steps, caps {sum(s.cap_s for s in chosen)} s "
          f"(all {len(steps)} steps: {sum(s.cap_s for s in steps)} s of at most {PLANNED_S})")
    for s in chosen:
        print(f"  {s.name:>10}  cap {s.cap_s:3d} s  {s.command}")
    summary_file = Path(args.out) / f"gpu_{gpu}.json"
    print(f"  then the summary, {_shown(summary_file)}; `python -m minilora readme` puts it in the README")
    if args.dry_run:
        return 0
    results = {}
    for s in chosen:
        print(f"\n=== {s.name} (cap {s.cap_s} s): {s.command}", flush=True)
        if s.file is not None:
            s.file.parent.mkdir(parents=True, exist_ok=True)
            s.file.unlink(missing_ok=True)
        results[s.name] = run_command(s.argv, s.cap_s)
        print(f"=== {s.name}: {results[s.name]['status']} in {results[s.name]['wall_s']:.0f} s", flush=True)
    summary = summarize(steps, results, device, shlex.join(["python", "-m", "minilora.bench.gpu", *argv]))
    print_summary(summary)
    write_result(summary, summary_file)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
