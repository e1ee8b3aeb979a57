"""Benchmark fine-tuning memory and speed: full FT vs LoRA vs QLoRA (ours, and PEFT + bitsandbytes) side by side.

    python -m minilora.bench.qlora                           # GPU: GPT-2 124M and a 1.3B GPT-2 shape, batch 4 × 512
    python -m minilora.bench.qlora --quick                   # CPU-sized smoke run (what CI runs)
    python -m minilora.bench.qlora --shapes gpt2 --batch 8 --seq 1024 --methods qlora,peft_qlora

Every row trains random weights (speed and memory do not depend on their values) on random tokens, bf16 autocast
on GPU, all linear layers adapted at rank 16 (alpha 32) for the LoRA rows:
    full        fp32 weights, every one trained, torch AdamW (mixed precision: fp32 master weights)
    lora        16-bit frozen base, fp32 LoRA factors, AdamW
    qlora       NF4 frozen base (minilora/qlora.py), fp32 LoRA factors, AdamW
    qlora_paged as qlora, with PagedAdamW (Adam state in CPU memory)
    peft_qlora  Hugging Face GPT-2 loaded in 4 bits by bitsandbytes + PEFT LoRA (when importable; like ours,
                without prepare_model_for_kbit_training's gradient checkpointing)
Peak memory is torch.cuda.max_memory_allocated over the timed steps (weights, gradients, optimizer state,
activations); on CPU it is not measured (None). Step time: median of the timed steps, after warm-up.
Also: the bytes of the adapted weights at 16 bits vs as stored NF4, next to nf4.bits_per_param's prediction.
"""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

import torch

from minilora import PRESETS, GPT, GPTConfig, attach
from minilora.bench.dequant import _cpu_name, _versions
from minilora.full import FullConfig
from minilora.lora import LoRAConfig
from minilora.qlora import Linear4bit, QLoRAConfig, weight_memory_gb
from minilora.train import default_optimizer
from minilora.bench import write_result

SHAPES = {
    "gpt2": PRESETS["gpt2"],  # 124M
    "1.3b": GPTConfig(block_size=1024, vocab_size=50257, n_layer=24, n_head=16, n_embd=2048),  # GPT-3 XL's 1.3B shape
    "quick": GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64),  # CPU smoke
}
METHODS = ("full", "lora", "qlora", "qlora_paged", "peft_qlora")
R, ALPHA = 16, 32


def build(method: str, cfg: GPTConfig, device, base_dtype, hf_dir=None):
    """(model, optimizer, step function) for one row; the model lives on `device`."""
    torch.manual_seed(0)
    if method == "peft_qlora":
        return _build_peft(cfg, device, hf_dir)
    with torch.device(device):
        model = GPT(cfg)
    if method == "full":
        attach(model, FullConfig())
    else:
        model.to(base_dtype)  # the frozen base in 16 bits (quantized from it for QLoRA)
        config = (LoRAConfig(r=R, alpha=ALPHA, targets="all-linear") if method == "lora" else
                  QLoRAConfig(r=R, alpha=ALPHA, paged_optimizer=method == "qlora_paged"))
        attach(model, config)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA factors in fp32, as PEFT keeps them
    opt = model.minilora_config.optimizer(model, 1e-4, 0.0) or default_optimizer(model, 1e-4, 0.0)
    return model, opt, lambda x, y: model(x, y)[1]


def _build_peft(cfg, device, hf_dir):
    import transformers
    from peft import LoraConfig, get_peft_model

    compute = torch.bfloat16 if device == "cuda" else torch.float32
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=bnb, dtype=compute,
                                                           device_map={"": device}, attn_implementation="sdpa")
    hf.config.use_cache = False
    model = get_peft_model(hf, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                                          target_modules=["c_attn", "c_proj", "c_fc"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            weight_decay=0.0)
    return model, opt, lambda x, y: model(input_ids=x, labels=x).loss  # HF shifts the labels itself


def measure(method, cfg, args, device, hf_dir=None) -> dict:
    cuda = device == "cuda"
    base_dtype = torch.bfloat16 if cuda else torch.float32  # CPU: no fast bf16 matmuls, stay in fp32
    model, opt, loss_fn = build(method, cfg, device, base_dtype, hf_dir)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)  # (B, T)
    y = torch.roll(x, -1, dims=1)
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT counts a Params4bit byte as two weights
        trainable, total = model.get_nb_trainable_parameters()
    else:  # ours: parameters plus the NF4 weights, which are buffers
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = model.num_params() + sum(m.meta.numel() for m in model.modules() if isinstance(m, Linear4bit))
    row = dict(method=method, trainable_params=trainable, total_params=total)
    if cuda:
        torch.cuda.synchronize()
        row["memory_before_steps_mb"] = torch.cuda.memory_allocated() / 2**20  # weights (and nothing else)
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    row.update(step_ms=1e3 * statistics.median(times), step_ms_min=1e3 * min(times), loss_first=losses[0],
               loss_last=losses[-1], tokens_per_s=args.batch * args.seq / statistics.median(times),
               peak_memory_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)
    del model, opt, loss_fn
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def weight_memory(cfg: GPTConfig, device) -> dict:
    """Bytes of the adapted (all-linear) weights: 16-bit vs stored NF4 + double quant, measured and predicted."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg).to(torch.bfloat16)
    attach(model, QLoRAConfig(r=R, alpha=ALPHA))
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    n = sum(m.meta.numel() for m in layers)
    nf4 = sum(getattr(m, k).numel() * getattr(m, k).element_size() for m in layers
              for k in ("packed", "absmax", "absmax_scale", "absmax_offset"))
    out = dict(adapted_weights=n, bf16_mb=2 * n / 2**20, nf4_mb=nf4 / 2**20, nf4_bits_per_param=8 * nf4 / n,
               predicted_nf4_mb=weight_memory_gb(n, "nf4") * 1e9 / 2**20)
    del model, layers
    gc.collect()
    return out


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    shapes = args.shapes.split(",") if args.shapes else (["quick"] if args.quick or device == "cpu" else
                                                          ["gpt2", "1.3b"])
    methods = args.methods.split(",") if args.methods else list(METHODS)
    unknown = [s for s in shapes if s not in SHAPES] + [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown shapes/methods {unknown}: shapes are {sorted(SHAPES)}, methods {list(METHODS)}")
    rows, weights = [], {}
    for shape in shapes:
        cfg = SHAPES[shape]
        if args.seq > cfg.block_size:
            raise SystemExit(f"--seq {args.seq} is longer than {shape}'s block_size {cfg.block_size}; pick ≤ it")
        weights[shape] = weight_memory(cfg, device)
        with tempfile.TemporaryDirectory() as hf_dir:
            for method in methods:
                if method == "peft_qlora" and not _peft_ready(device, cfg, hf_dir):
                    skipped = "transformers/peft/bitsandbytes not importable"
                    rows.append(dict(shape=shape, method=method, skipped=skipped))
                    continue
                try:
                    rows.append(dict(shape=shape, batch=args.batch, seq=args.seq, **measure(method, cfg, args, device,
                                                                                           hf_dir)))
                except Exception as e:  # e.g. out of memory at a big shape: report it, keep going
                    rows.append(dict(shape=shape, method=method, error=repr(e)[:300]))
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
            "versions": {**_versions(), **_more_versions()},
            "command": "python -m minilora.bench.qlora " + shlex.join(args.argv),
            "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps, "r": R, "alpha": ALPHA,
            "autocast": "bf16" if device == "cuda" else None,
            "shapes": {s: asdict(SHAPES[s]) for s in shapes}, "weight_memory": weights, "rows": rows}


def _peft_ready(device, cfg, hf_dir) -> bool:
    """Import transformers, peft and bitsandbytes; write the Hugging Face copy of the base (once per shape)."""
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers
    except Exception:  # not installed, or no bitsandbytes backend for this machine
        return False
    if not os.path.exists(os.path.join(hf_dir, "config.json")):
        transformers.utils.logging.disable_progress_bar()
        torch.manual_seed(0)
        with torch.device(device):
            base = GPT(cfg).to(torch.bfloat16 if device == "cuda" else torch.float32)
        base.cpu().save_pretrained(hf_dir, hf=True)  # the same random weights as our rows (seed 0)
    return True


def _more_versions() -> dict:
    out = {}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def print_table(result: dict) -> None:
    print(f"{result['device']}  torch {result['versions']['torch']}  batch {result['batch']} × seq {result['seq']}")
    for shape, w in result["weight_memory"].items():
        print(f"{shape}: adapted weights {w['adapted_weights']:,}: bf16 {w['bf16_mb']:.2f} MiB, "
              f"NF4+DQ {w['nf4_mb']:.2f} MiB ({w['nf4_bits_per_param']:.3f} bits/param, "
              f"predicted {w['predicted_nf4_mb']:.2f} MiB)")
    print(f"{'shape':>6} {'method':>12} {'trainable':>13} {'ms/step':>9} {'peak MiB':>9} {'loss':>15}")
    for r in result["rows"]:
        if "error" in r or "skipped" in r:
            print(f"{r['shape']:>6} {r['method']:>12}  {r.get('error') or 'skipped: ' + r['skipped']}")
            continue
        peak = f"{r['peak_memory_mb']:9.0f}" if r["peak_memory_mb"] is not None else f"{'-':>9}"
        print(f"{r['shape']:>6} {r['method']:>12} {r['trainable_params']:13,} {r['step_ms']:9.1f} {peak} "
              f"{r['loss_first']:7.3f}→{r['loss_last']:.3f}")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m minilora.bench.qlora", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", help=f"comma-separated, of {sorted(SHAPES)} (default: gpt2,1.3b on GPU, quick on CPU)")
    p.add_argument("--methods", help=f"comma-separated, of {list(METHODS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny shape, batch 2 × seq 32, few steps (the CI smoke run)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 4, quick 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 512, quick 32)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps; the median is reported (default 10, quick 2)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--out", default=os.path.join("runs", "bench_qlora.json"), help="where to write the JSON")
    args = p.parse_args(argv)
    args.argv = argv
    for name, normal, quick in (("batch", 4, 2), ("seq", 512, 32), ("warmup", 3, 1), ("steps", 10, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    result = run(args)
    print_table(result)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
