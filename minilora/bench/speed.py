"""Benchmark training speed of every registered method: forward / backward / optimizer-step time, tokens/s and
memory on one model and batch, PEFT's LoRA and DoRA on the same weights, and merged vs unmerged inference.

    python -m minilora.bench.speed                       # CPU: the tiny preset (what the notebook runs)
    python -m minilora.bench.speed --quick               # CPU smoke run on a toy shape (what CI runs)
    python -m minilora.bench.speed --preset gpt2,1b      # GPU: GPT-2 124M and the ~1B shape, bf16 autocast
    python -m minilora.bench.speed --preset gpt2 --methods full,lora,dora --out data/results/bench_speed_h100.json

Presets (model, batch x seq; random weights and tokens: speed and memory do not depend on their values):
    quick  2 layers, C 32, V 64, 2 x 16          (CI)
    tiny   the embedded base's shape (minilora.PRESETS["tiny"], 1.4M parameters), 8 x 64
    gpt2   GPT-2 124M (PRESETS["gpt2"]), 8 x 512
    1b     a ~1B LLaMA-like shape built from our GPT-2 block: 16 layers, C 2048, 16 heads of 128, LLaMA's 32000
           vocabulary, block_size 2048; a GELU MLP of 4C = 8192 (two matrices, not SwiGLU's three), LayerNorm,
           learned positions, tied embeddings: 0.88B parameters. 4 x 1024
Rows: every method in minilora.METHODS (import minilora registers them; --modules imports more) with its default
config (--r / --targets override the configs that have them), skipped with the reason when it fails to attach
or to step on the shape; then PEFT's LoRA and DoRA on Hugging Face's GPT2LMHeadModel holding the same weights,
with the rank and targets of minilora's LoRA (when peft is installed); on CUDA also PEFT LoRA and DoRA on the
base loaded in 4 bits by bitsandbytes (QLoRA's and QDoRA's counterparts).
One step: forward and the cross-entropy (fp32 weights; bf16 autocast on CUDA, none on the CPU), backward, then the
method's callbacks, the optimizer step (the method's own, else train.default_optimizer; no clipping) and
zero_grad; the callbacks see the first steps of a 300-step run. Each phase is timed with perf_counter after
torch.cuda.synchronize (CPU: perf_counter); the medians of --iters steps after --warmup. On the CPU the models are
timed round-robin, one step each per round (--interleave), so that a machine's drifting load slows every row alike;
on a GPU one after another. Memory, from one more step: on CUDA torch.cuda.max_memory_allocated during each
phase; on the CPU the tensor bytes (train.tensor_memory: weights, gradients, optimizer state; plus the
activations autograd saves, train.SavedTensorMeter). `memory_kind` says which.
Targets (reported, not asserted): LoRA's step <= 0.85x full fine-tuning's; minilora's LoRA step faster than PEFT's
on the same model. `predicted_lora_over_full` is the matmul-FLOP prediction of the first (step_flops).
Inference: one forward of --infer-batch x seq tokens, no grad: the base, LoRA unmerged and merged (minilora.merge),
DoRA unmerged (DoRALinear.forward recomputes f = m/||W0 + s BA|| at every call, with ||W0||^2 cached), merged,
served by serve.LoRAServer (f computed once, when the adapter is added), and the norms alone (every layer's f).
Writes a JSON with the device, versions, command line and, per preset, rows, targets and inference.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from minilora import METHODS, GPT, GPTConfig, PRESETS, attach, merge
from minilora.bench import write_result
from minilora.bench.dequant import _cpu_name, _versions, time_us
from minilora.bench.dora import _logits, _models
from minilora.bench.qlora import _more_versions
from minilora.dora import DoRALinear
from minilora.train import SavedTensorMeter, TrainConfig, TrainState, default_optimizer, tensor_memory

SHAPES = {  # preset: (model, batch, seq)
    "quick": (GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=48), 2, 16),  # + 20 prompt vectors
    "tiny": (PRESETS["tiny"], 8, 64),
    "gpt2": (PRESETS["gpt2"], 8, 512),
    "1b": (GPTConfig(block_size=2048, vocab_size=32000, n_layer=16, n_head=16, n_embd=2048), 4, 1024),
}
TARGETS = {"lora_vs_full": 0.85, "lora_vs_peft_lora": 1.0}  # step-time ratios, at most (the second: strictly less)
PHASES = ("forward", "backward", "optimizer")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


# ------------------------------------------------------------------------------ one training step, in phases
def time_phases(forward, backward, step, warmup: int, iters: int, cuda: bool):
    """Run warmup + iters steps of forward() -> loss, backward(loss), step(). Returns ([[forward, backward,
    optimizer] ms per timed step], [loss per step]). Each phase ends with a synchronize on CUDA, so its time
    is the device's work, not only the launches (this also stops the next phase's launches overlapping it)."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, losses = [], []
    for i in range(warmup + iters):
        sync()
        t0 = time.perf_counter()
        loss = forward()
        sync()
        t1 = time.perf_counter()
        backward(loss)
        sync()
        t2 = time.perf_counter()
        step()
        sync()
        t3 = time.perf_counter()
        losses.append(loss.item())
        if i >= warmup:
            times.append([1e3 * (t1 - t0), 1e3 * (t2 - t1), 1e3 * (t3 - t2)])
    return times, losses


class Runner:
    """One model's training step as three calls, forward() -> loss, backward(loss), step(), with its method's
    optimizer and callbacks (train.train's choices: config.optimizer() or train.default_optimizer)."""

    def __init__(self, model, lr: float, x, y, device: str, autocast, total_steps: int):
        self.model, self.x, self.y, self.device, self.autocast = model, x, y, device, autocast
        config = getattr(model, "minilora_config", None)
        own = config.optimizer(model, lr, 0.0) if config is not None else None
        self.opt = own or default_optimizer(model, lr, 0.0)
        self.callbacks = config.callbacks(model) if config is not None else []
        # the callbacks see a run of train's default length (300 steps) whose first steps are timed: AdaLoRA
        # then updates its importance scores, and its rank budget has not begun to prune
        run = TrainConfig(steps=max(TrainConfig().steps, total_steps), progress=False)
        self.state = TrainState(model, self.opt, run)
        for cb in self.callbacks:
            cb.on_train_start(self.state)
        model.train()
        self.times, self.losses = [], []  # [forward, backward, optimizer] ms per timed step; loss per step

    def forward(self):
        with torch.autocast(self.device, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            logits = _logits(self.model, self.x)  # (B, T, V), minilora's GPT or Hugging Face's
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), self.y.view(-1))

    def backward(self, loss):
        loss.backward()

    def step(self, before_zero_grad=None):
        self.state.step += 1
        for cb in self.callbacks:  # e.g. AdaLoRA's orthogonality gradient, LoRA-FA's projection
            cb.on_before_optimizer_step(self.state)
        self.opt.step()
        if before_zero_grad is not None:
            before_zero_grad()
        for cb in self.callbacks:  # e.g. AdaLoRA's rank allocation
            cb.on_step_end(self.state)
        self.opt.zero_grad(set_to_none=True)

    def run(self, n: int, timed: bool, cuda: bool):
        times, losses = time_phases(self.forward, self.backward, self.step, 0 if timed else n, n if timed else 0, cuda)
        self.times += times
        self.losses += losses

    def memory(self, cuda: bool) -> dict:
        """MiB through one more step. CUDA: allocated before it, and max_memory_allocated during each phase.
        CPU: weights, gradients and optimizer state (train.tensor_memory, after the optimizer step, before
        zero_grad) and the activations the forward saved for backward (train.SavedTensorMeter)."""
        mib = 2**-20
        if cuda:
            out = {}

            def peak(phase):
                torch.cuda.synchronize()
                out[phase] = torch.cuda.max_memory_allocated() * mib
                torch.cuda.reset_peak_memory_stats()

            torch.cuda.synchronize()
            out["before"] = torch.cuda.memory_allocated() * mib  # weights + optimizer state
            torch.cuda.reset_peak_memory_stats()
            loss = self.forward()
            peak("forward")
            self.backward(loss)
            peak("backward")
            self.step()
            peak("optimizer")
            out["peak"] = max(out[p] for p in PHASES)
            return out
        meter = SavedTensorMeter(self.model)
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            loss = self.forward()
        self.backward(loss)
        held = {}
        self.step(before_zero_grad=lambda: held.update(tensor_memory(self.model, self.opt)))
        out = {k: v * mib for k, v in {**held, "activations": meter.bytes}.items()}
        out["total"] = sum(out.values())
        return out

    def summary(self, cuda: bool) -> dict:
        steps = [sum(t) for t in self.times]
        phases = {f"{p}_ms": statistics.median(t[i] for t in self.times) for i, p in enumerate(PHASES)}
        return dict(trainable_params=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                    step_ms=statistics.median(steps), step_ms_min=min(steps), **phases,
                    tokens_per_s=self.x.numel() / (1e-3 * statistics.median(steps)), loss_first=self.losses[0],
                    loss_last=self.losses[-1], memory_mib=self.memory(cuda), steps_ms=self.times)


def measure_rows(builders, args, x, y, device, autocast) -> list:
    """One row per builder: timed steps, or the reason it was skipped. With args.interleave every model is alive
    at once and the timed steps go round-robin (model 1, 2, ..., 1, 2, ...), so that a machine whose load drifts
    slows every row alike; otherwise one model after another (what fits a GPU's memory at large shapes)."""
    cuda, rows = device == "cuda", []

    def skip(row, why):
        row["skipped"] = why[:300]
        print(f"skipped {row['impl']} {row['method']}: {row['skipped']}")

    builders = list(builders)
    for group in [builders] if args.interleave else [[b] for b in builders]:
        live = []
        for impl, method, lr, build in group:
            rows.append(row := dict(impl=impl, method=method))
            if lr is None:  # build is the reason
                skip(row, build)
                continue
            try:
                runner = Runner(_hf_no_cache(build()), lr, x, y, device, autocast, args.warmup + args.iters + 1)
                live.append((row, runner))
            except Exception as e:  # a method that does not fit this shape: say why, keep going
                skip(row, f"attach failed: {e!r}")
        for i in range(1 + args.iters):  # round 0: every model's warm-up; then one timed step of each per round
            for row, runner in live:
                if "skipped" in row:
                    continue
                try:
                    runner.run(args.warmup if i == 0 else 1, timed=i > 0, cuda=cuda)
                    if i == args.iters:
                        row.update(runner.summary(cuda))
                except Exception as e:  # e.g. out of memory at a big shape
                    skip(row, f"step failed: {e!r}")
        del live
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ the rows
def config_for(name: str, args):
    """The registered method's default config, with --r (alpha = 2r, as LoRA's default) and --targets applied to
    the configs that have those fields."""
    cls = METHODS[name].config_cls
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    if args.r is not None and "r" in fields:
        kw["r"] = args.r
        kw.update({"alpha": 2 * args.r} if "alpha" in fields else {})
    if args.targets is not None and "targets" in fields:
        kw["targets"] = args.targets if args.targets == "all-linear" else args.targets.split(",")
    return cls(**kw)


def _peft_args(args) -> SimpleNamespace:
    """PEFT's rows take minilora's LoRA config: the same rank and targets (bench/dora.py's _models reads these)."""
    lora = config_for("lora", args)
    targets = lora.targets if isinstance(lora.targets, str) else ",".join(lora.targets)
    return SimpleNamespace(r=lora.r, targets=targets, no_peft=args.no_peft)


def _peft_4bit(hf_dir, device, pa, dora: bool):
    """PEFT LoRA (or DoRA) on Hugging Face's GPT-2 loaded in NF4 + double quant by bitsandbytes (CUDA)."""
    import peft
    import transformers

    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=bnb, device_map={"": device},
                                                           attn_implementation="sdpa")
    targets = pa.targets if pa.targets == "all-linear" else pa.targets.split(",")
    return peft.get_peft_model(hf, peft.LoraConfig(r=pa.r, lora_alpha=2 * pa.r, lora_dropout=0.0,
                                                   target_modules=targets, use_dora=dora))


def _builders(base: GPT, args, tmp: str, device):
    """(impl, method, lr, build() -> model on device) for every row, or (impl, method, None, skip reason)."""
    for name in METHODS:
        if args.methods and name not in args.methods:
            continue

        def build(name=name):
            model = copy.deepcopy(base).to(device)  # attached on the device: PiSSA's SVDs, QLoRA's quantization
            return attach(model, config_for(name, args))
        yield "minilora", name, METHODS[name].lr, build
    if args.no_peft:
        return
    pa = _peft_args(args)
    peft_rows = [(impl, m, b) for impl, m, b in _models(base, pa, tmp) if impl == "peft"]  # saves base to tmp
    if not peft_rows:
        yield "peft", "lora", None, "peft/transformers not importable"
        return
    for impl, method, build in peft_rows:
        yield impl, method, METHODS[method].lr, lambda build=build: build().to(device)
    for method in ("lora", "dora"):
        if device != "cuda":
            yield "peft+bnb4", method, None, "bitsandbytes 4-bit rows run on CUDA only"
            continue
        yield "peft+bnb4", method, METHODS["q" + method].lr, lambda d=method == "dora": _peft_4bit(tmp, device, pa, d)


def _hf_no_cache(model):
    """Hugging Face's GPT-2 builds a KV cache in forward unless told not to; training needs none."""
    if hasattr(model, "get_base_model"):  # a PEFT model (minilora's GPT has no cache)
        model.get_base_model().config.use_cache = False
    return model


def run_preset(preset: str, args, device, autocast) -> dict:
    cfg, B, T = SHAPES[preset]
    B, T = args.batch or B, args.seq or T
    if T > cfg.block_size:
        raise SystemExit(f"--seq {T} is longer than {preset}'s block_size {cfg.block_size}; pick <= it")
    torch.manual_seed(0)
    base = GPT(cfg)  # on the CPU: the same random weights for every row (copied, then moved)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    x, y = idx[:, :-1].to(device), idx[:, 1:].contiguous().to(device)  # (B, T) each
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's and transformers' advice about fan_in_fan_out, 4-bit dtypes, ...
        rows = measure_rows(_builders(base, args, tmp, device), args, x, y, device, autocast)
        inference = infer(base, args, device, autocast, T)
    pa = _peft_args(args)
    return {"preset": preset, "model": dataclasses.asdict(cfg), "params": base.num_params(), "batch": B, "seq": T,
            "rows": rows, "targets": check_targets(rows),
            "predicted_lora_over_full": predicted_ratio(cfg, B, T, pa.r, pa.targets),
            "inference": inference}


def check_targets(rows) -> dict:
    step = {(r["impl"], r["method"]): r["step_ms"] for r in rows if "step_ms" in r}

    def ratio(a, b, limit, strict):
        q = step[a] / step[b] if a in step and b in step else None
        passed = None if q is None or limit is None else q < limit if strict else q <= limit
        return dict(ratio=q, target=limit, passed=passed)

    return {"lora_vs_full": ratio(("minilora", "lora"), ("minilora", "full"), TARGETS["lora_vs_full"], False),
            "lora_vs_peft_lora": ratio(("minilora", "lora"), ("peft", "lora"), TARGETS["lora_vs_peft_lora"], True),
            "dora_vs_peft_dora": ratio(("minilora", "dora"), ("peft", "dora"), None, True)}  # no target: for reading


# ------------------------------------------------------------------------------ the prediction
def step_flops(cfg: GPTConfig, B: int, T: int, trained: str, r: int = 0, targets=("c_attn",)) -> dict:
    """Matmul FLOPs of one step (2 per multiply-add). A linear (d_in -> d_out) on N = B·T tokens costs 2N·d_in·d_out
    forward; backward the same again for ∂L/∂x, and again for ∂L/∂W only if W trains. Attention's
    q kᵀ and p v: 4·B·T²·C forward (every position counted, as a dense kernel computes it), twice that backward.
    trained="full": every weight trains. trained="lora": W0 frozen, rank-r A, B beside `targets` (or
    "all-linear"), whose own matmuls cost 2N·r·(d_in + d_out) forward and twice that backward. Ignored: the
    element-wise ops, the optimizer (memory-bound), and that nothing below the first adapter needs ∂L/∂x."""
    C, V, N = cfg.n_embd, cfg.vocab_size, B * T
    linears = {"c_attn": (C, 3 * C), "attn.c_proj": (C, C), "c_fc": (C, 4 * C), "mlp.c_proj": (4 * C, C)}
    adapted = set(linears) if targets == "all-linear" else {k for k in linears if any(k.endswith(t) for t in targets)}
    fwd = bwd = 0
    for name, (d_in, d_out) in linears.items():
        w = 2 * N * d_in * d_out
        fwd, bwd = fwd + w, bwd + (2 * w if trained == "full" else w)
        if trained == "lora" and name in adapted:
            a = 2 * N * r * (d_in + d_out)
            fwd, bwd = fwd + a, bwd + 2 * a
    attention = 4 * B * T * T * C
    fwd, bwd = cfg.n_layer * (fwd + attention), cfg.n_layer * (bwd + 2 * attention)
    head = 2 * N * C * V  # lm_head, tied to wte: its weight trains only in full fine-tuning
    return {"forward": fwd + head, "backward": bwd + (2 * head if trained == "full" else head)}


def predicted_ratio(cfg, B, T, r, targets) -> float:
    targets = targets if targets == "all-linear" else tuple(targets.split(","))
    full, lora = step_flops(cfg, B, T, "full"), step_flops(cfg, B, T, "lora", r, targets)
    return sum(lora.values()) / sum(full.values())


# ------------------------------------------------------------------------------ inference
def infer(base: GPT, args, device, autocast, T: int) -> dict:
    """Latency of one forward (no grad) of --infer-batch x T tokens: LoRA and DoRA unmerged, merged, and DoRA's
    other paths. The adapters get random B (as after training), so merging changes the weights."""
    from minilora.serve import LoRAServer

    cuda = device == "cuda"
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, base.config.vocab_size, (args.infer_batch, T), generator=g).to(device)
    plain = copy.deepcopy(base).to(device).eval()
    models = {}
    for method in ("lora", "dora"):
        model = attach(copy.deepcopy(base).to(device), config_for(method, args)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        models[method] = model
    models["lora merged"] = merge(copy.deepcopy(models["lora"]))  # copies: the rounds alternate between them
    models["dora merged"] = merge(copy.deepcopy(models["dora"]))
    dora_layers = [m for m in models["dora"].modules() if isinstance(m, DoRALinear)]

    server = {}

    def served():
        if not server:  # built at the first (untimed) call: f = m/‖W0 + s·BA‖ computed once, in add()
            rank = max(m.lora_A[m.active].weight.size(0) for m in dora_layers)
            server["dora"] = LoRAServer(plain, n_slots=1, max_rank=rank)
            server["dora"].add("dora", models["dora"])
        return server["dora"].forward(x, ["dora"] * x.size(0))

    paths = [("base", "plain GPT", lambda: plain(x)[0], None),
             ("lora", "unmerged", lambda: models["lora"](x)[0], None),
             ("lora", "merged", lambda: models["lora merged"](x)[0], "lora"),
             ("dora", "unmerged", lambda: models["dora"](x)[0], None),
             ("dora", "served, f cached (serve.LoRAServer)", served, "dora"),
             ("dora", "norms alone: every layer's f", lambda: [m.scale(m.active) for m in dora_layers], None),
             ("dora", "merged", lambda: models["dora merged"](x)[0], "dora")]
    rows, unmerged, times = [], {}, {}
    rounds, per_round = (args.infer_iters, 1) if args.interleave else (1, args.infer_iters)
    with torch.no_grad(), torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
        for method, mode, fn, reference in paths:
            rows.append(row := dict(method=method, mode=mode))
            try:
                out = fn()
            except Exception as e:  # a path this machine cannot run: report it, keep going
                row["error"] = repr(e)[:300]
                continue
            if mode == "unmerged":
                unmerged[method] = out
            row["max_abs_diff"] = (None if reference is None else
                                   (out.float() - unmerged[reference].float()).abs().max().item())
            times[mode, method] = []
        for i in range(rounds):  # round-robin with args.interleave, as the training rows
            for method, mode, fn, _ in paths:
                if (mode, method) in times:
                    times[mode, method].append(time_us(fn, args.warmup if i == 0 else 0, per_round, cuda))  # µs
    for row in rows:
        if "error" not in row:
            t = times[row["mode"], row["method"]]
            row.update(ms_median=statistics.median(m for m, _ in t) / 1e3, ms_min=min(b for _, b in t) / 1e3)
    return {"batch": args.infer_batch, "seq": T, "rows": rows}


# ------------------------------------------------------------------------------ output
def print_table(result: dict) -> None:
    print(f"{result['device']}  torch {result['versions']['torch']}  peft {result['versions'].get('peft')}  "
          f"autocast {result['autocast']}")
    print(f"memory: {result['memory_kind']}")
    cuda = result["memory_kind"].startswith("cuda")
    for run in result["runs"]:
        print(f"\n{run['preset']}: {run['params']:,} parameters, batch {run['batch']} x {run['seq']}")
        mem_head = "peak MiB (fwd/bwd/opt)" if cuda else "MiB (weights+grads+opt+act)"
        print(f"{'impl':>10} {'method':>14} {'trainable':>11} {'step ms':>9} {'fwd':>9}{'bwd':>9}{'opt':>9} "
              f"{'tokens/s':>10}  {mem_head}")
        for r in run["rows"]:
            if "skipped" in r:
                print(f"{r['impl']:>10} {r['method']:>14}  skipped: {r['skipped'][:90]}")
                continue
            m = r["memory_mib"]
            parts = ("forward", "backward", "optimizer") if cuda else ("weights", "grads", "optimizer", "activations")
            mem = "/".join(f"{m[k]:.0f}" for k in parts) if cuda else (
                f"{m['total']:.2f} = " + "+".join(f"{m[k]:.2f}" for k in parts))
            print(f"{r['impl']:>10} {r['method']:>14} {r['trainable_params']:11,} {r['step_ms']:9.2f} "
                  + "".join(f"{r[p + '_ms']:9.2f}" for p in PHASES) + f" {r['tokens_per_s']:10,.0f}  {mem}")
        for name, t in run["targets"].items():
            verdict = "" if t["target"] is None else "n/a" if t["passed"] is None else "PASS" if t["passed"] else "FAIL"
            q = "missing row" if t["ratio"] is None else f"{t['ratio']:.3f}"
            goal = "(no target)" if t["target"] is None else f"target {'<' if 'peft' in name else '<='} {t['target']}"
            print(f"  {name:>18}: step ratio {q} {goal} {verdict}")
        print(f"  predicted LoRA / full step (matmul FLOPs): {run['predicted_lora_over_full']:.3f}")
        inf = run["inference"]
        print(f"  inference, one forward of {inf['batch']} x {inf['seq']} tokens (no grad):")
        for r in inf["rows"]:
            if "error" in r:
                print(f"    {r['method']:>5} {r['mode']:>38}  error: {r['error'][:60]}")
                continue
            diff = "" if r["max_abs_diff"] is None else f"  max|Δ| vs unmerged {r['max_abs_diff']:.1e}"
            print(f"    {r['method']:>5} {r['mode']:>38} {r['ms_median']:9.3f} ms{diff}")


def plot_phases(run: dict, ax=None, title: str = ""):
    """Horizontal stacked bars, one per row: forward, backward, optimizer step (median ms)."""
    import matplotlib.pyplot as plt

    rows = [r for r in run["rows"] if "skipped" not in r]
    labels = [r["method"] if r["impl"] == "minilora" else f"{r['impl']} {r['method']}" for r in rows]
    ax = ax or plt.subplots(figsize=(7, 0.3 * len(rows) + 1))[1]
    left = [0.0] * len(rows)
    for phase, color in zip(PHASES, ("#4c72b0", "#dd8452", "#55a868")):
        widths = [r[f"{phase}_ms"] for r in rows]
        ax.barh(labels, widths, left=left, color=color, label=phase)
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set(xlabel="ms per step (median of each phase)",
           title=title or f"{run['preset']}: batch {run['batch']} x {run['seq']}")
    ax.legend(fontsize=8, loc="lower right")
    return ax


def run(args) -> dict:
    for module in args.modules or []:
        importlib.import_module(module)  # registers its method(s)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    autocast = AUTOCAST[args.autocast or ("bf16" if device == "cuda" else "none")]
    presets = ["quick"] if args.quick else (args.preset or ("gpt2" if device == "cuda" else "tiny")).split(",")
    unknown = [p for p in presets if p not in SHAPES] + [m for m in args.methods or [] if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown presets/methods {unknown}: presets are {sorted(SHAPES)}, "
                         f"methods {sorted(METHODS)} (a method in another module: --modules minilora.<file>)")
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
        "versions": {**_versions(), **_more_versions()},
        "command": "python -m minilora.bench.speed " + shlex.join(args.argv),
        "autocast": args.autocast or ("bf16" if device == "cuda" else "none"),
        "memory_kind": ("cuda: torch.cuda.max_memory_allocated during each phase (MiB)" if device == "cuda" else
                        "cpu: tensor bytes, train.tensor_memory + train.SavedTensorMeter (MiB)"),
        "warmup": args.warmup, "iters": args.iters, "infer_iters": args.infer_iters, "interleave": args.interleave,
        "targets": TARGETS,
        "runs": [run_preset(p, args, device, autocast) for p in presets],
    }


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m minilora.bench.speed", description=__doc__.splitlines()[0])
    p.add_argument("--preset", help=f"comma-separated, of {sorted(SHAPES)} (default: gpt2 on GPU, tiny on CPU)")
    p.add_argument("--quick", action="store_true", help="the quick preset and few steps (the CI smoke run)")
    p.add_argument("--methods", type=lambda s: s.split(","), help="only these registered methods (default: all)")
    p.add_argument("--modules", type=lambda s: s.split(","), help="import these modules first (methods not yet in "
                                                                  "minilora/__init__.py), e.g. minilora.vera")
    p.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--r", type=int, help="rank of the configs that have one, alpha = 2r (default: each method's)")
    p.add_argument("--targets", help="comma-separated module suffixes or all-linear, for the configs that have "
                                     "targets (default: each method's)")
    p.add_argument("--autocast", choices=sorted(AUTOCAST), help="autocast dtype (default bf16 on GPU, none on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3, quick 1)")
    p.add_argument("--iters", type=int, help="timed steps; the medians are reported (default 10, quick 3)")
    p.add_argument("--infer-batch", type=int, default=1, help="sequences in the inference forward (default 1)")
    p.add_argument("--infer-iters", type=int, help="timed inference forwards (default 50, quick 3)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction,
                   help="time the models round-robin, all alive at once (default: on for CPU, off for GPU, "
                        "where the memory columns would then count every model)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's rows even if installed")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--out", default=os.path.join("runs", "bench_speed.json"), help="where to write the JSON")
    args = p.parse_args(argv)
    args.argv = argv
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.iters = args.iters if args.iters is not None else (3 if args.quick else 10)
    args.infer_iters = args.infer_iters if args.infer_iters is not None else (3 if args.quick else 50)
    if args.interleave is None:
        args.interleave = not (torch.cuda.is_available() and not args.cpu)
    result = run(args)
    print_table(result)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
