"""The command line: python -m minilora {compare, finetune, pretrain, generate} --help."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from . import METHODS, attach, save_adapter
from .bench.gpu import summary_markdown
from .checkpoint import CheckpointError, atomic_write_text
from .data import TASKS, corpus_tokens, load_task
from .gpt import GPT, PRESETS
from .plots import plot_compare
from .settings import BASE_DIR, DATA_DIR, quick
from .tokenizer import get_tokenizer
from .train import CorpusData, TrainConfig, summary, train

DEFAULT_TASK = "lastparam"
RESULTS_DIR = DATA_DIR / "results"  # committed results that the README table is made from


def parse_opts(method: str, opts: list[str]):
    """Build the method's config from ["r=8", "targets=all-linear", "layers=[0,1]"]."""
    cls = METHODS[method].config_cls
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for opt in opts:
        key, sep, raw = opt.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--opt {opt!r}: {method} takes KEY=VALUE with KEY in {sorted(known)}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw  # a plain string such as all-linear
    return cls(**values)


def load_base(path=None, **overrides) -> GPT:
    path = Path(path) if path else BASE_DIR
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"no base model in {path}: make one with `python -m minilora pretrain "
                              f"--out {path}` or pass --model DIR")
    return GPT.from_pretrained(path, **overrides)


def finetune(method: str, config=None, task_name=DEFAULT_TASK, model_dir=None, train_cfg=None):
    """Fine-tune the base with one method; returns (model, metrics record)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    spec = METHODS[method]
    model = load_base(model_dir)
    n_base = model.num_params()  # before attach: a quantized base keeps its weights as buffers, not parameters
    train_cfg = train_cfg or TrainConfig(lr=spec.lr)
    torch.manual_seed(train_cfg.seed)  # the method's random init (LoRA's A, ...) is part of the run: seed it too
    attach(model, config if config is not None else spec.config_cls())
    task = load_task(task_name)
    record = train(model, task, train_cfg)
    # trainable share of the base model's parameters, the same denominator for every method
    record.update(total_params=n_base, trainable_pct=100.0 * record["trainable_params"] / n_base)
    return model, {"method": method, "task": task_name, "lr": train_cfg.lr, **record}


def compare_config(args) -> TrainConfig:
    q = args.quick or quick()
    return TrainConfig(steps=args.steps or (20 if q else 240), batch_size=args.batch_size,
                       eval_every=args.steps or (20 if q else 80), eval_examples=64 if q else 256,
                       seed=args.seed, progress=not args.no_progress)


def compare(args):
    methods = args.methods.split(",") if args.methods else list(METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {sorted(METHODS)}")
    rows = []
    for m in methods:
        print(f"== {m}: {METHODS[m].description}", flush=True)
        cfg = dataclasses.replace(compare_config(args), lr=METHODS[m].lr)
        _, record = finetune(m, task_name=args.task, model_dir=args.model, train_cfg=cfg)
        rows.append(record)
    out = Path(args.out)
    results = {"task": args.task, "quick": args.quick or quick(), "torch": torch.__version__,
               "command": "python -m minilora " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if getattr(args, "update", False) and (out / "compare.json").is_file():  # merge into the earlier run's rows
        old = json.loads((out / "compare.json").read_text())
        if (old["task"], old["quick"], old["rows"][0]["steps"]) != (args.task, results["quick"], rows[0]["steps"]):
            raise ValueError(f"--update: {out / 'compare.json'} holds task {old['task']!r}, quick={old['quick']}, "
                             f"{old['rows'][0]['steps']} steps; rerun it whole instead of mixing settings")
        ours = {r["method"] for r in rows}
        results.update(command=f"{old['command']}; then {results['command']}", date=f"{old['date']}, {results['date']}",
                       rows=[r for r in old["rows"] if r["method"] not in ours] + rows)
    atomic_write_text(out / "compare.json", json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    atomic_write_text(out / "compare.md", table + "\n")
    plot_compare(results, out / "compare.png")
    print(table)
    print(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {out / 'compare.png'}")
    return results


def markdown_table(results) -> str:
    lines = [f"Task `{results['task']}`, {results['rows'][0]['steps']} steps per method, "
             f"device {results['rows'][0]['device']}, torch {results['torch']} "
             f"(`{results['command']}`).", "",
             "| method | trainable params | % | memory (MB) | s/step | tokens/s | val loss | test loss | test acc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        test = r.get("test", {"loss": float("nan"), "accuracy": float("nan")})
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_pct']:.2f} | "
                     f"{r['peak_memory_mb']:.1f} | {r['s_per_step']:.3f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['val']['loss']:.3f} | {test['loss']:.3f} | {100 * test['accuracy']:.1f}% |")
    return "\n".join(lines)


README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def results_markdown(results_dir=RESULTS_DIR) -> str:
    """The README's results section, made only from the committed result files in data/results/."""
    parts = []
    compare_json = Path(results_dir) / "compare.json"
    if compare_json.is_file():
        parts += ["### `python -m minilora compare` (CPU, the embedded default)", "",
                  markdown_table(json.loads(compare_json.read_text())), "",
                  "Memory is counted from the tensors on the CPU: weights + gradients + optimizer state + the "
                  "activations autograd saved for backward (`minilora/train.py::tensor_memory`, "
                  "`SavedTensorMeter`); % is of the base's 1,334,016 parameters. The base model scores 0.0 % "
                  "(notebook 00).", "",
                  "![accuracy vs trainable parameters](data/results/compare.png)", ""]
    for path in sorted(Path(results_dir).glob("gpu_*.json")):  # python -m minilora.bench.gpu's summaries
        parts += [summary_markdown(json.loads(path.read_text()), path.name), ""]
    for path in sorted(Path(results_dir).glob("bench_*.json")):
        bench = json.loads(path.read_text())
        parts += [f"### `{path.stem}` on {bench['device']} (torch {bench['versions']['torch']})", "",
                  f"Command: `{bench['command']}`; file: `data/results/{path.name}`.", "",
                  bench_table(bench), ""]
    return "\n".join(parts).strip()


def bench_table(bench) -> str:
    rows = bench["rows"]
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list)) or k == "shape"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append("x".join(map(str, v)) if isinstance(v, list) else
                         f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(readme=README) -> None:
    text = Path(readme).read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} section to fill")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_text(readme, f"{head}{BEGIN}\n{results_markdown()}\n{END}{tail}")
    print(f"updated the results section of {readme}")


def pretrain(args):
    """Pretrain a base GPT on the embedded corpus; with the defaults this reproduces data/base."""
    torch.manual_seed(args.seed)
    model = GPT(PRESETS[args.preset])
    bs = model.config.block_size
    data = CorpusData(corpus_tokens("train"), corpus_tokens("val"), bs)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=100,
                      weight_decay=0.1, eval_every=max(1, args.steps // 10), eval_examples=512,
                      keep_best=False, seed=args.seed, progress=not args.no_progress)
    t0 = time.time()
    record = train(model, data, cfg)
    model.save_pretrained(args.out)
    print(f"pretrained {args.preset} for {args.steps} steps in {time.time() - t0:.0f} s; "
          f"val loss {record['val']['loss']:.3f}; saved to {args.out}")
    return record


def generate(args):
    enc = get_tokenizer()
    model = load_base(args.model)
    if args.adapter:
        from . import load_adapter
        load_adapter(model, args.adapter)
    model.eval()
    idx = torch.tensor([enc.encode(args.prompt, allowed_special="all")], dtype=torch.long)
    g = torch.Generator().manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         eos_id=enc.eot_token, generator=g)
    text = enc.decode([t for t in out[0].tolist() if t != enc.eot_token])
    print(text)
    return text


def build_parser():
    methods = "\n".join(f"  {m.name:10s} {m.description}; options: "
                        f"{', '.join(f.name for f in dataclasses.fields(m.config_cls)) or 'none'}"
                        for m in METHODS.values())
    p = argparse.ArgumentParser(prog="python -m minilora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"methods:\n{methods}\n\ntasks:\n" +
                                "\n".join(f"  {k:10s} {v}" for k, v in TASKS.items()))
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--model", default=None, help=f"base model directory (default {BASE_DIR})")
        sp.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser("compare", help="fine-tune the base with every method and print one table")
    common(c)
    c.add_argument("--methods", help="comma-separated subset (default: all)")
    c.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASKS), help="task (default %(default)s)")
    c.add_argument("--steps", type=int, help="steps per method (default 240; 20 with --quick)")
    c.add_argument("--batch-size", type=int, default=32, help="default %(default)s")
    c.add_argument("--quick", action="store_true", help="a fast smoke run (also MINILORA_QUICK=1)")
    c.add_argument("--out", default="runs/compare", help="output directory (default %(default)s)")
    c.add_argument("--update", action="store_true",
                   help="replace or add these methods' rows in an existing OUT/compare.json (same task and steps)")

    f = sub.add_parser("finetune", help="fine-tune the base with one method and save the adapter")
    common(f)
    f.add_argument("--method", required=True, choices=sorted(METHODS))
    f.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a field of the method's config, e.g. --opt r=8 --opt targets=all-linear")
    f.add_argument("--task", default=DEFAULT_TASK, choices=sorted(TASKS))
    f.add_argument("--steps", type=int, default=300)
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--lr", type=float, help="peak learning rate (default: the method's)")
    f.add_argument("--out", help="adapter directory (default runs/finetune-METHOD)")

    t = sub.add_parser("pretrain", help="pretrain a base GPT on the embedded corpus")
    t.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--out", default="runs/base", help="where to save (data/base is the committed one)")

    sub.add_parser("readme", help="rewrite README.md's results section from data/results/*.json")

    g = sub.add_parser("generate", help="sample text from the base (optionally with an adapter)")
    common(g)
    g.add_argument("--prompt", default="def ")
    g.add_argument("--adapter", help="adapter directory from finetune")
    g.add_argument("--max-new-tokens", type=int, default=60)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "compare":
            return compare(args)
        if args.command == "finetune":
            spec = METHODS[args.method]
            cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr or spec.lr,
                              eval_every=max(1, args.steps // 3), seed=args.seed,
                              progress=not args.no_progress)
            model, record = finetune(args.method, parse_opts(args.method, args.opt), args.task,
                                     args.model, cfg)
            if args.no_progress:
                print(summary(record))  # train() printed it already when the progress bar was on
            out = save_adapter(model, args.out or f"runs/finetune-{args.method}")
            print(f"saved the adapter to {out}")
            return record
        if args.command == "pretrain":
            return pretrain(args)
        if args.command == "generate":
            return generate(args)
        if args.command == "readme":
            return update_readme()
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e}\n")
