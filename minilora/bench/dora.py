"""Benchmark DoRA against LoRA: training-step time and peak memory, minilora's and PEFT's, on one model.

    python -m minilora.bench.dora                          # GPU: GPT-2 124M shapes, batch 8 x 1024, bf16 autocast
    python -m minilora.bench.dora --quick                  # CPU smoke run on a tiny shape (what CI runs)
    python -m minilora.bench.dora --targets all-linear --batch 4 --out runs/my.json

One step = forward under autocast, cross-entropy, backward, AdamW step on the adapter. Rows: minilora LoRA,
minilora DoRA, and PEFT's LoRA and DoRA on Hugging Face's GPT-2 holding the same weights (when installed).
Targets, printed next to the measured ratios: DoRA ≤ 1.2x LoRA's step time and ≤ 1.1x its peak memory.
Prediction: DoRA keeps one more activation per adapted layer for backward, z = W0 x + b + s·BAx (B, T, d_out),
needed for ∂L/∂m; everything else it adds is (d_out,) or (d_out, r). `saved_mib` counts what autograd keeps
after one forward (device-independent; weights excluded), next to that prediction.
Timing: CUDA events around each step after warm-up (CPU: perf_counter); the median (and min). Peak memory:
torch.cuda.max_memory_allocated over the warm-up and timed steps, weights included (CPU: not measured).
Writes a JSON with the device, versions, command line, rows and ratios.
"""
import argparse
import copy
import gc
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from minilora import METHODS, GPT, GPTConfig, PRESETS, DoRAConfig, LoRAConfig, attach
from minilora.bench.dequant import _cpu_name
from minilora.dora import DoRALinear
from minilora.bench import write_result

QUICK_CPU = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)
TARGETS = {"time": 1.2, "memory": 1.1}  # DoRA / LoRA, at most
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed, or fails to load here
            out[name] = None
    return out


def saved_mib(model, idx, device, dtype) -> float:
    """MiB that autograd keeps for backward after one forward: distinct storages, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(device, dtype):
        _logits(model, idx)
    return sum(n for ptr, n in seen.items() if ptr not in params) / 2**20


def predicted_extra_mib(targets_d_out: list, B: int, T: int, dtype) -> float:
    """DoRA's one extra saved activation per adapted layer: z (B, T, d_out) in the activation dtype."""
    return sum(B * T * d * dtype.itemsize for d in targets_d_out) / 2**20


def _autocast(device, dtype):
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)


def _logits(model, idx):
    out = model(idx)
    return out[0] if isinstance(out, tuple) else out.logits  # minilora's GPT, or Hugging Face's


def _targets(args):
    return args.targets if args.targets == "all-linear" else args.targets.split(",")


def _models(base: GPT, args, tmp: str):
    """(impl, method, model) for every row runnable here; each built on CPU, moved to the device when timed."""
    targets = _targets(args)
    for method, cfg in (("lora", LoRAConfig), ("dora", DoRAConfig)):
        yield "minilora", method, lambda cfg=cfg: attach(copy.deepcopy(base), cfg(r=args.r, alpha=2 * args.r,
                                                                                   targets=targets))
    if args.no_peft:
        return
    try:
        import peft
        import transformers
    except Exception:  # not installed: minilora's rows only
        return
    transformers.utils.logging.disable_progress_bar()
    base.save_pretrained(tmp, hf=True)  # the same weights in Hugging Face's GPT-2 format
    for method in ("lora", "dora"):
        def build(dora=method == "dora"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hf = transformers.GPT2LMHeadModel.from_pretrained(tmp)
                return peft.get_peft_model(hf, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                               target_modules=targets, fan_in_fan_out=True,
                                                               use_dora=dora))
        yield "peft", method, build


def time_steps(model, batches, lr, device, dtype, warmup, iters):
    """Train `warmup` then `iters` steps; (step ms list, first loss, last loss, peak MiB or None)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + iters):
        x, y = batches[i % len(batches)]
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with _autocast(device, dtype):
            logits = _logits(model, x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        losses.append(loss.item())
        if i >= warmup:
            times.append(ms)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return times, losses[0], losses[-1], peak


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    dtype = DTYPES[args.dtype]
    if args.quick and device == "cpu":
        cfg, B, T = QUICK_CPU, args.batch or 2, args.seq or 16
    else:
        cfg = PRESETS[args.preset or ("gpt2" if device == "cuda" else "tiny")]
        B, T = args.batch or (1 if args.quick else 8 if device == "cuda" else 4), args.seq or cfg.block_size
    torch.manual_seed(0)
    base = GPT(cfg)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
        batches.append((idx[:, :-1].to(device), idx[:, 1:].contiguous().to(device)))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for impl, method, build in _models(base, args, tmp):
            model = build().to(device)
            if (impl, method) == ("minilora", "dora"):  # the d_out of every adapted linear, for the prediction
                adapted = [m.base_layer.out_features for m in model.modules() if isinstance(m, DoRALinear)]
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            saved = saved_mib(model, batches[0][0], device, dtype)
            lr = METHODS[method].lr
            times, first, last, peak = time_steps(model, batches, lr, device, dtype, args.warmup, args.iters)
            rows.append(dict(impl=impl, method=method, trainable_params=trainable, ms_median=statistics.median(times),
                             ms_min=min(times), peak_mib=peak, saved_mib=saved, loss_first=first, loss_last=last))
            del model
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
    ratios = {}
    for impl in ("minilora", "peft"):
        r = {row["method"]: row for row in rows if row["impl"] == impl}
        if {"lora", "dora"} <= r.keys():
            lo, do = r["lora"], r["dora"]
            ratios[impl] = dict(time=do["ms_median"] / lo["ms_median"],
                                memory=do["peak_mib"] / lo["peak_mib"] if lo["peak_mib"] else None,
                                saved=do["saved_mib"] / lo["saved_mib"],
                                saved_extra_mib=do["saved_mib"] - lo["saved_mib"])
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "versions": _versions(),
        "command": "python -m minilora.bench.dora " + shlex.join(args.argv),
        "model": dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size, batch=B, seq=T),
        "dtype": args.dtype, "targets_modules": args.targets, "r": args.r, "warmup": args.warmup, "iters": args.iters,
        "predicted_extra_saved_mib": predicted_extra_mib(adapted, B, T, dtype),
        "targets": TARGETS,
        "rows": rows,
        "ratios": ratios,
    }


def print_table(result: dict) -> None:
    m = result["model"]
    print(f"{result['device']}  torch {result['versions']['torch']}  {m['n_layer']} layers, C {m['n_embd']}, "
          f"batch {m['batch']} x {m['seq']}, {result['dtype']}, targets {result['targets_modules']}, r {result['r']}")
    print(f"{'impl':>9} {'method':>6} {'trainable':>10} {'ms/step':>9} {'peak MiB':>9} {'saved MiB':>10}  "
          f"loss first -> last")
    for r in result["rows"]:
        peak = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
        print(f"{r['impl']:>9} {r['method']:>6} {r['trainable_params']:10d} {r['ms_median']:9.2f} {peak} "
              f"{r['saved_mib']:10.3f}  {r['loss_first']:.4f} -> {r['loss_last']:.4f}")
    t = result["targets"]
    for impl, q in result["ratios"].items():
        mem = f"{q['memory']:.2f}" if q["memory"] is not None else "n/a (CPU)"
        print(f"{impl:>9} DoRA / LoRA: time {q['time']:.2f} (target <= {t['time']}), peak memory {mem} "
              f"(target <= {t['memory']}), saved +{q['saved_extra_mib']:.3f} MiB "
              f"(predicted +{result['predicted_extra_saved_mib']:.3f} for minilora)")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m minilora.bench.dora", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="CPU: a tiny model and few steps (the CI smoke run); GPU: batch 1")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: gpt2 on GPU, tiny on CPU)")
    p.add_argument("--batch", type=int, help="sequences per step (default 8 on GPU, 4 on CPU, 2 quick)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's block_size)")
    p.add_argument("--targets", default="c_attn", help="comma-separated module suffixes, or all-linear")
    p.add_argument("--r", type=int, default=8, help="rank (alpha = 2r, as the methods' defaults)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype (fp32: no autocast)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5, quick 1)")
    p.add_argument("--iters", type=int, default=None, help="timed steps; the median is reported (default 20, quick 2)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's rows even if installed")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--out", default=os.path.join("runs", "bench_dora.json"), help="where to write the JSON")
    args = p.parse_args(argv)
    args.argv = argv
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.iters = args.iters if args.iters is not None else (2 if args.quick else 20)
    result = run(args)
    print_table(result)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
