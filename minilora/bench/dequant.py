"""Benchmark NF4 dequantization: Triton kernel vs PyTorch reference (eager, compiled) vs bitsandbytes.

    python -m minilora.bench.dequant                      # GPU: 4096x4096, 4096x14336, 8192x28672 bf16
    python -m minilora.bench.dequant --quick              # CPU-sized smoke run (what CI runs)
    python -m minilora.bench.dequant --shapes 256x256,512x1024 --out runs/my.json

Dequantization reads the 4-bit weight and its constants and writes the weight: it is memory-bound, so each
row reports the fraction of the measured device-to-device copy bandwidth it reaches. Minimum traffic,
from the tensors' sizes (bf16 out, double quant): 0.5 (packed) + 2 (out) + 1/64 (uint8 absmax)
+ 4/(64·256) (fp32 c1) ≈ 2.516 bytes per weight, plus the offset and the two small code tables.
Timing: CUDA events around each call, the L2 flushed and the GPU kept busy ~0.1 ms before it so host launch
latency is hidden (CPU: perf_counter), after warm-up; the median (and min) of the repeats.
Writes a JSON with the device, versions, command line and rows.
"""
import argparse
import os
import platform
import shlex
import statistics
import sys
import time

import torch

from minilora.nf4 import DYNAMIC_CODE, dequantize_nf4, quantize_nf4
from minilora.bench import write_result

GPU_SHAPES = "4096x4096,4096x14336,8192x28672"
CPU_SHAPES = "256x256,1024x1024"
QUICK_SHAPES = {"cuda": "4096x4096", "cpu": "64x128,96x100"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_shapes(text: str) -> list:
    try:
        return [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        raise SystemExit(f"--shapes {text!r}: write shapes as ROWSxCOLS separated by commas, e.g. 256x256,512x1024")


def bytes_moved(tensors, out_numel: int, dtype: torch.dtype) -> int:
    """Minimum traffic of one dequant: every stored tensor read once, the output written once."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) + out_numel * dtype.itemsize


def time_us(fn, warmup: int, iters: int, cuda: bool, flush=None) -> tuple:
    """(median, min) microseconds per call of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(iters):
            if flush is not None:
                flush.zero_()  # evict the previous call's data from L2 (50 MB on an H100)
            if hasattr(torch.cuda, "_sleep"):
                torch.cuda._sleep(200_000)  # ~0.1 ms GPU spin: the launches below queue up behind it, so the
                #                             events time the GPU work, not host launch latency or hiccups
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)  # ms → µs
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times), min(times)


def copy_bandwidth(device: str, nbytes: int, warmup: int, iters: int, flush) -> float:
    """GB/s of dst.copy_(src): nbytes read + nbytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med, _ = time_us(lambda: dst.copy_(src), warmup, iters, device == "cuda", flush)
    return 2 * nbytes / (med * 1e-6) / 1e9


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} threads, CPU)"
    except (OSError, IndexError):
        return platform.machine() + " (CPU)"


def _versions() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed, or fails to load on this machine
            out[name] = None
    return out


def _methods(q, w, dtype, device, args):
    """(name, double_quant, fn, stored tensors) for every method runnable here."""
    stored = [q.packed, q.absmax, q.absmax_scale, q.absmax_offset, q.code, DYNAMIC_CODE]
    methods = [("reference_eager", True, lambda: dequantize_nf4(q, dtype), stored)]
    if args.compile:
        compiled = torch.compile(dequantize_nf4)
        methods.append(("reference_compiled", True, lambda: compiled(q, dtype), stored))
    if device == "cuda":
        try:
            from minilora.kernels.nf4_dequant import dequantize_nf4_triton

            methods.append(("triton", True, lambda: dequantize_nf4_triton(q, dtype), stored))
            q_nodq = quantize_nf4(w, double_quant=False)
            methods.append(("triton", False, lambda: dequantize_nf4_triton(q_nodq, dtype),
                            [q_nodq.packed, q_nodq.absmax, q_nodq.code]))
        except ImportError:
            pass
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # not installed, or no backend for this machine
        bnbF = None
    if bnbF is not None and not args.no_bnb:
        for dq in (True, False):
            packed, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
            tensors = [packed, st.absmax, st.code] + ([st.state2.absmax, st.state2.code, st.offset] if dq else [])
            methods.append(("bitsandbytes", dq, lambda p=packed, s=st: bnbF.dequantize_4bit(p, s), tensors))
    return methods


def run(args) -> dict:
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cuda = device == "cuda"
    dtype = DTYPES[args.dtype]
    shapes = parse_shapes(args.shapes or (QUICK_SHAPES[device] if args.quick else GPU_SHAPES if cuda else CPU_SHAPES))
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=device) if cuda and not args.no_flush else None
    copy_gbps = copy_bandwidth(device, (512 if cuda else 32) * 2**20, args.warmup, args.iters, flush)
    rows = []
    for d_out, d_in in shapes:
        w = (torch.randn(d_out, d_in, device=device) * 0.02).to(dtype)  # (d_out, d_in), LLM-like scale
        q = quantize_nf4(w)
        reference = {dq: dequantize_nf4(quantize_nf4(w, double_quant=dq), dtype) for dq in (True, False)}
        for name, dq, fn, tensors in _methods(q, w, dtype, device, args):
            try:
                out = fn()
                med, best = time_us(fn, args.warmup, args.iters, cuda, flush)
            except Exception as e:  # e.g. torch.compile without a C++ compiler: report, keep going
                rows.append(dict(shape=[d_out, d_in], method=name, double_quant=dq, error=repr(e)[:300]))
                continue
            nbytes = bytes_moved(tensors, w.numel(), dtype)
            gbps = nbytes / (med * 1e-6) / 1e9
            row = dict(shape=[d_out, d_in], method=name, double_quant=dq, dtype=args.dtype, us_median=med, us_min=best,
                       bytes=nbytes, bytes_per_param=nbytes / w.numel(), gbps=gbps, pct_copy_bw=100 * gbps / copy_gbps)
            # reference = dequantize_nf4(quantize_nf4(w, double_quant=dq)); bitsandbytes used its own quantizer
            ref = reference[dq].reshape(-1)
            row["bit_identical_to_reference"] = torch.equal(out.reshape(-1).view(torch.uint8), ref.view(torch.uint8))
            row["max_abs_diff_vs_reference"] = (out.float().reshape(-1) - ref.float()).abs().max().item()
            rows.append(row)
    return {
        "device": torch.cuda.get_device_name() if cuda else _cpu_name(),
        "versions": _versions(),
        "command": "python -m minilora.bench.dequant " + shlex.join(args.argv),
        "copy_gbps": copy_gbps,
        "warmup": args.warmup,
        "iters": args.iters,
        "rows": rows,
    }


def print_table(result: dict) -> None:
    print(f"{result['device']}  torch {result['versions']['torch']}  copy bandwidth {result['copy_gbps']:.0f} GB/s")
    print(f"{'shape':>12} {'method':>20} {'DQ':>3} {'µs (median)':>12} {'B/param':>8} {'GB/s':>8} {'% copy':>7}  check")
    for r in result["rows"]:
        shape = "x".join(map(str, r["shape"]))
        if "error" in r:
            print(f"{shape:>12} {r['method']:>20} {'y' if r['double_quant'] else 'n':>3}  error: {r['error'][:60]}")
            continue
        check = f"bit-identical={r['bit_identical_to_reference']} max|Δ|={r['max_abs_diff_vs_reference']:.1e}"
        print(f"{shape:>12} {r['method']:>20} {'y' if r['double_quant'] else 'n':>3} {r['us_median']:12.1f} "
              f"{r['bytes_per_param']:8.4f} {r['gbps']:8.1f} {r['pct_copy_bw']:7.1f}  {check}")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m minilora.bench.dequant", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", help=f"ROWSxCOLS,… (default: {GPU_SHAPES} on GPU, {CPU_SHAPES} on CPU)")
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (the CI smoke run)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weight and output dtype")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 10, quick 1)")
    p.add_argument("--iters", type=int, default=None, help="timed calls; the median is reported (default 50, quick 3)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time torch.compile(dequantize_nf4) (default: on for GPU, off for CPU)")
    p.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes even if importable")
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 between timed calls")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if CUDA is available")
    p.add_argument("--out", default=os.path.join("runs", "bench_dequant.json"), help="where to write the JSON")
    args = p.parse_args(argv)
    args.argv = argv
    on_gpu = torch.cuda.is_available() and not args.cpu
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10)
    args.iters = args.iters if args.iters is not None else (3 if args.quick else 50)
    args.compile = args.compile if args.compile is not None else on_gpu
    result = run(args)
    print_table(result)
    write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()
