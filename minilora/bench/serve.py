"""Benchmark serving many LoRA adapters at once: tokens/s against the number of distinct adapters in a batch.

    python -m minilora.bench.serve                     # GPU: GPT-2 124M shapes, 256 rows x 8 tokens, 1/16/100 adapters
    python -m minilora.bench.serve --quick             # CPU smoke run on a tiny model (what CI runs)
    python -m minilora.bench.serve --counts 1,8,64 --batch 64 --seq 16 --targets all-linear --out runs/my.json
    python -m minilora.bench.serve --counts 1,16,100,1000 --batch 1024     # GPU, up to 1,000 adapters: slow

The GPU default ran in 53 s on one H200 (torch 2.11.0+cu130); the former one, 1024 rows and up to 1,000 adapters,
had not finished after 70 s with the same repeats, so 1,000 adapters is a choice of --counts.

Workload: one forward (logits at every position) of B rows x T tokens; row i uses adapter i mod k, for k distinct
adapters. Adapters: LoRA with ranks cycling through --ranks on --targets, A and B random, on a base of random
weights. The methods, which give the same logits (max |Δ| against server-torch is reported):
    server-torch        minilora.serve.LoRAServer: one W0 x for the batch, rows grouped by adapter, padded bmm
    server-triton       the same with the BGMV kernel, minilora/kernels/bgmv.py (CUDA only)
    merge-switch        one adapter after another: W0 <- W0 + s·BA in every adapted linear, forward its rows
    loop-adapter_rows   minilora's lora.adapter_rows: one update per adapter per linear (a Python loop)
    peft-adapter_names  PEFT's mixed batch, model(input_ids, adapter_names=...), on Hugging Face's GPT-2 holding
                        the same weights (when peft is installed; off by default with --quick: its import is slow)
The server's pool has max(counts) slots, so all of a batch's adapters fit; the first (cold) batch pages them in
from CPU memory, and its transfer time is reported. A second table streams batches of --stream-rows rows whose
adapters follow a Zipf law over all max(counts) adapters through pools of different sizes: LRU hit rate, transfer
time and tokens/s (transfers included).
Timing: CUDA events around each call after warm-up (CPU: perf_counter), as bench/dequant.py; the median (and min).
Writes a JSON with the device, versions, command line and rows.
"""
import argparse
import copy
import importlib.metadata
import os
import shlex
import sys
import tempfile
import time
import warnings

import torch

from minilora import GPT, GPTConfig, PRESETS, LoRAConfig, attach
from minilora import lora
from minilora.bench import write_result
from minilora.bench.dequant import _cpu_name, time_us
from minilora.lora import LoRALinear
from minilora.serve import LoRAServer, extract

QUICK_CPU = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=16)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULTS = {  # (preset, batch, seq, counts, ranks, stream rows); "quick" is QUICK_CPU
    "cuda": ("gpt2", 256, 8, "1,16,100", "8,16,32,64", 64),
    "cuda-quick": ("gpt2", 256, 8, "1,16,256", "8,16,32,64", 64),
    "cpu": ("tiny", 64, 16, "1,2,4,8,16,32,64", "4,8,16", 16),
    "cpu-quick": ("quick", 8, 8, "1,2,4,8", "2,4,8", 4),
}


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("triton", "transformers", "peft"):  # from the installed metadata: importing them takes seconds
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def make_zoo(base: GPT, n: int, ranks: list, targets, seed: int = 0):
    """The base with n LoRA adapters a0 ... a{n-1} attached (ranks cycling), sharing the base's weights.
    The first is attached by minilora.attach; the others are added to each LoRALinear directly, which is what
    lora.add_adapter does minus its re-scan of the whole model, so 1000 adapters take seconds, not minutes."""
    names = [f"a{i}" for i in range(n)]
    zoo = copy.deepcopy(base, {id(p): p for p in base.parameters()})  # new modules, the same W0 tensors
    attach(zoo, LoRAConfig(r=ranks[0], alpha=2 * ranks[0], targets=targets, adapter_name=names[0]))
    linears = [m for m in zoo.modules() if isinstance(m, LoRALinear)]
    for i, name in enumerate(names[1:], 1):
        r = ranks[i % len(ranks)]
        for m in linears:
            m.add(name, r, 2 * r)
        zoo.lora_configs[name] = LoRAConfig(r=r, alpha=2 * r, targets=targets, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B = 0 at init: random B so that every adapter changes the logits
        for m in linears:
            for name in names:
                B = m.lora_B[name].weight
                B.copy_(torch.randn(B.shape, generator=g) * 0.02)
    return zoo.eval(), names


def merge_switch(base, factors: dict, idx, rows: list):
    """Serve a batch one adapter at a time with merged weights: W = W0 + s·BA (one addmm from a kept copy of W0),
    forward the rows of that adapter, next adapter; W0 written back at the end. factors: name -> module -> (B, A, s)."""
    linears = {n: base.get_submodule(n) for f in factors.values() for n in f}
    w0 = {n: m.weight.detach().clone() for n, m in linears.items()}
    out = None
    with torch.no_grad():
        for name in dict.fromkeys(rows):  # the loop over adapters that batching them avoids
            sel = torch.tensor([i for i, r in enumerate(rows) if r == name], device=idx.device)
            for n, W in linears.items():
                if n in factors.get(name, {}):
                    B, A, s = factors[name][n]
                    torch.addmm(w0[n], B, A, alpha=s, out=W.weight.data)  # W0 + s·B A: (d_out, r) @ (r, d_in)
                else:  # no adapter (None), or one that does not adapt this module
                    W.weight.data.copy_(w0[n])
            logits = base(idx[sel])[0]
            out = logits.new_empty(len(rows), *logits.shape[1:]) if out is None else out
            out[sel] = logits
        for n, m in linears.items():
            m.weight.data.copy_(w0[n])
    return out


def peft_model(base, zoo, names, ranks, targets, device, dtype, tmp):
    """PEFT's LoRA on Hugging Face's GPT-2 with the base's weights and the zoo's adapters (same A, B, scaling)."""
    import peft
    import transformers

    transformers.utils.logging.disable_progress_bar()
    base.save_pretrained(tmp, hf=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).to(device=device, dtype=dtype).eval()
        cfg = lambda r: peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets,  # noqa: E731
                                        fan_in_fan_out=True)
        # autocast_adapter_dtype=False: PEFT would keep bf16/fp16 adapters in fp32; here they are in the base's dtype
        pm = peft.get_peft_model(hf, cfg(ranks[0]), adapter_name=names[0], autocast_adapter_dtype=False)
        for i, name in enumerate(names[1:], 1):
            pm.add_adapter(name, cfg(ranks[i % len(ranks)]), autocast_adapter_dtype=False)
    with torch.no_grad():
        for n, m in zoo.named_modules():
            if isinstance(m, LoRALinear):
                theirs = pm.base_model.model.get_submodule(n)
                for name in names:
                    theirs.lora_A[name].weight.copy_(m.lora_A[name].weight)  # (r, d_in), as ours
                    theirs.lora_B[name].weight.copy_(m.lora_B[name].weight)  # (d_out, r)
    return pm.eval()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def stream(server_args, registry, base, rows_per_batch, pools, n_batches, T, device, seed=0, alpha=1.0):
    """Batches whose adapters are drawn from a Zipf law (p ∝ 1/rank^alpha) over the registry, through LRU pools of
    each size: hit rate, page-in time and tokens/s (transfers included)."""
    names = list(registry)
    p = 1.0 / torch.arange(1, len(names) + 1, dtype=torch.float64) ** alpha
    g = torch.Generator().manual_seed(seed)
    draws = torch.multinomial(p.expand(n_batches, -1), rows_per_batch, replacement=True, generator=g)  # (batches, rows)
    idx = torch.randint(0, base.config.vocab_size, (rows_per_batch, T), generator=g).to(device)
    out = []
    for n_slots in pools:
        server = LoRAServer(base, n_slots=n_slots, **server_args)
        for name, ad in registry.items():
            server.add(name, ad)
        _sync(device)
        t0 = time.perf_counter()
        for batch in draws.tolist():
            server.forward(idx, [names[i] for i in batch])
        _sync(device)
        seconds = time.perf_counter() - t0
        st = server.pool.stats()
        out.append(dict(n_slots=n_slots, population=len(names), rows=rows_per_batch, batches=n_batches, zipf=alpha,
                        hit_rate=st["hit_rate"], misses=st["misses"], transfer_s=st["transfer_s"],
                        transfer_mib=st["transfer_mib"], pool_mib=st["pool_mib"],
                        tokens_per_s=n_batches * rows_per_batch * T / seconds, transfer_share=st["transfer_s"] / seconds))
    return out


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cuda = device == "cuda"
    preset, B, T, counts, ranks, stream_rows = DEFAULTS[device + "-quick" * args.quick]
    cfg = QUICK_CPU if (args.preset or preset) == "quick" else PRESETS[args.preset or preset]
    B, T = args.batch or B, args.seq or T
    counts = [int(c) for c in (args.counts or counts).split(",")]
    ranks = [int(r) for r in (args.ranks or ranks).split(",")]
    if max(counts) > B:
        raise SystemExit(f"--counts up to {max(counts)} needs a batch of at least {max(counts)} rows (--batch {B})")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    torch.manual_seed(0)
    base = GPT(cfg).to(device=device, dtype=dtype).eval()
    zoo, names = make_zoo(base, max(counts), ranks, targets)
    registry = extract(zoo)  # name -> ServedAdapter, on the CPU
    server = LoRAServer(base, n_slots=max(counts), max_rank=max(ranks), backend="torch")
    for name, ad in registry.items():
        server.add(name, ad)
    factors = {name: {n: (m.lora_B[name].weight, m.lora_A[name].weight, m.scaling[name])
                      for n, m in zoo.named_modules() if isinstance(m, LoRALinear)} for name in names}
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(1)).to(device)
    methods = ["server-torch"] + ["server-triton"] * (cuda and not args.no_triton) + ["merge-switch", "loop-adapter_rows"]
    tmp = tempfile.TemporaryDirectory()
    pm = None
    if args.peft:
        try:
            pm = peft_model(base, zoo, names, ranks, targets, device, dtype, tmp.name)
            methods.append("peft-adapter_names")
        except ImportError:  # not installed: the other rows only
            pass

    def call(method, rows):
        if method.startswith("server"):
            server.backend = method.removeprefix("server-")
            return server.forward(idx, rows)
        if method == "merge-switch":
            return merge_switch(base, factors, idx, rows)
        with torch.no_grad():
            if method == "loop-adapter_rows":
                with lora.adapter_rows(zoo, rows):
                    return zoo(idx)[0]
            return pm(input_ids=idx, adapter_names=rows).logits

    table = []
    for k in counts:
        rows = [names[i % k] for i in range(B)]
        before = server.pool.stats()
        reference = call("server-torch", rows)  # the cold batch: pages in the adapters not yet resident
        paged = {key: server.pool.stats()[key] - before[key] for key in ("misses", "transfer_s", "transfer_mib")}
        for method in methods:
            try:
                out = call(method, rows)
                med, best = time_us(lambda: call(method, rows), args.warmup, args.iters, cuda)
            except Exception as e:  # e.g. the kernel on an unsupported GPU: report, keep going
                table.append(dict(adapters=k, method=method, error=repr(e)[:300]))
                continue
            table.append(dict(adapters=k, method=method, ms_median=med / 1e3, ms_min=best / 1e3,
                              tokens_per_s=B * T / (med * 1e-6),
                              max_abs_diff=(out.float() - reference.float()).abs().max().item(),
                              **({f"cold_{key}": v for key, v in paged.items()} if method == "server-torch" else {})))
            del out
    tmp.cleanup()
    pm = None  # PEFT's copy of the adapters: freed before the stream
    pools = sorted({min(max(counts), stream_rows * m) for m in (1, 2, 4, 8, 16)} | {max(counts)})
    streamed = stream(dict(max_rank=max(ranks), backend="torch"), server.adapters, base, min(stream_rows, max(counts)),
                      pools, args.stream_batches, T, device)
    return {
        "device": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "versions": _versions(),
        "command": "python -m minilora.bench.serve " + shlex.join(args.argv),
        "model": dict(n_layer=cfg.n_layer, n_embd=cfg.n_embd, vocab_size=cfg.vocab_size, batch=B, seq=T),
        "dtype": str(dtype).removeprefix("torch."), "targets": args.targets, "ranks": ranks,
        "pool_mib": server.pool.stats()["pool_mib"], "warmup": args.warmup, "iters": args.iters,
        "rows": table,
        "stream": streamed,
    }


def print_table(result: dict) -> None:
    m = result["model"]
    print(f"{result['device']}  torch {result['versions']['torch']}  {m['n_layer']} layers, C {m['n_embd']}, "
          f"V {m['vocab_size']}, batch {m['batch']} x {m['seq']} tokens, {result['dtype']}, targets "
          f"{result['targets']}, ranks {result['ranks']}, pool {result['pool_mib']:.1f} MiB")
    print(f"{'adapters':>8} {'method':>19} {'ms':>9} {'tokens/s':>11} {'max|Δ|':>8}  cold batch: paged in")
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['adapters']:8d} {r['method']:>19}  error: {r['error'][:70]}")
            continue
        cold = (f"  {r['cold_misses']} adapters, {r['cold_transfer_mib']:.2f} MiB in {1e3 * r['cold_transfer_s']:.2f} ms"
                if "cold_misses" in r else "")
        print(f"{r['adapters']:8d} {r['method']:>19} {r['ms_median']:9.3f} {r['tokens_per_s']:11,.0f} "
              f"{r['max_abs_diff']:8.1e}{cold}")
    print(f"stream: Zipf batches through LRU pools of each size ({result['stream'][0]['population']} adapters, "
          f"{result['stream'][0]['rows']} rows a batch, {result['stream'][0]['batches']} batches)")
    print(f"{'slots':>6} {'hit rate':>9} {'misses':>7} {'paged MiB':>10} {'transfer ms':>12} {'share':>6} {'tokens/s':>11}")
    for s in result["stream"]:
        print(f"{s['n_slots']:6d} {s['hit_rate']:9.3f} {s['misses']:7d} {s['transfer_mib']:10.2f} "
              f"{1e3 * s['transfer_s']:12.2f} {s['transfer_share']:6.1%} {s['tokens_per_s']:11,.0f}")


def plot_result(result: dict, ax=None):
    """tokens/s against distinct adapters per batch, one line per method (log-log)."""
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(6, 4))[1]
    for method in dict.fromkeys(r["method"] for r in result["rows"]):
        pts = [(r["adapters"], r["tokens_per_s"]) for r in result["rows"] if r["method"] == method and "error" not in r]
        ax.plot(*zip(*pts), marker="o", label=method)
    ax.set(xscale="log", yscale="log", xlabel="distinct adapters in the batch", ylabel="tokens/s",
           title=f"{result['model']['batch']} rows x {result['model']['seq']} tokens, {result['device'][:40]}")
    ax.legend(fontsize=8)
    return ax


def parse_args(argv: list):
    p = argparse.ArgumentParser(prog="python -m minilora.bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="CPU: a tiny model, 8 rows, 1-8 adapters (the CI smoke run); GPU: 256 rows, 1-256 adapters")
    p.add_argument("--preset", choices=sorted(PRESETS), help="model shape (default: gpt2 on GPU, tiny on CPU)")
    p.add_argument("--batch", type=int, help="rows per batch (default 256 on GPU, 64 on CPU, 8 quick)")
    p.add_argument("--seq", type=int, help="tokens per row (default 8 on GPU, 16 on CPU, 8 quick)")
    p.add_argument("--counts", help="distinct adapters per batch, comma-separated (default GPU 1,16,100; "
                                    "CPU 1,2,4,...,64; quick 1,2,4,8)")
    p.add_argument("--ranks", help="adapter ranks, cycled (default GPU 8,16,32,64; CPU 4,8,16; quick 2,4,8)")
    p.add_argument("--targets", default="c_attn", help="comma-separated module suffixes, or all-linear")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2; GPU and quick 1)")
    p.add_argument("--iters", type=int, default=None,
                   help="timed calls; the median is reported (default 10; GPU 5; quick 2)")
    p.add_argument("--stream-batches", type=int, default=None, help="batches in the pool stream (default 50, quick 5)")
    p.add_argument("--peft", action=argparse.BooleanOptionalAction, default=None,
                   help="also time PEFT's adapter_names (default: on, off with --quick)")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton kernel's rows on GPU")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--out", default=os.path.join("runs", "bench_serve.json"), help="where to write the JSON")
    args = p.parse_args(argv)
    args.argv = argv
    gpu = torch.cuda.is_available() and not args.cpu and not args.quick  # the full GPU run: fewer repeats
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick or gpu else 2)
    args.iters = args.iters if args.iters is not None else (2 if args.quick else 5 if gpu else 10)
    args.stream_batches = args.stream_batches or (5 if args.quick else 50)
    args.peft = args.peft if args.peft is not None else not args.quick
    return args


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
