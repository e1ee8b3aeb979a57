"""The Triton NF4 dequant kernel equals minilora.nf4.dequantize_nf4 bit for bit.

On CPU the kernel runs in Triton's interpreter. TRITON_INTERPRET is read when @triton.jit decorates the kernel,
so the interpreter cases run in one subprocess (this file as a script) with the variable set, and the rest of
the pytest process never sees it. On a CUDA machine the same cases (and a large one) run on the GPU.
The dispatch's CUDA branch runs on the CPU too, for an OnCuda tensor (tests/cuda_standins.py: is_cuda says True).
"""
import json
import os
import subprocess
import sys
import zlib

import pytest
import torch

from cuda_standins import OnCuda
from minilora.nf4 import DYNAMIC_CODE, NF4Weight, dequantize_nf4, quantize_4bit, quantize_nf4

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (shape, dtype, double_quant, kind); small, the interpreter is slow
CASES = [((3, 7), d, dq, "randn") for d in DTYPES for dq in (True, False)] + [
    ((64,), "bf16", True, "randn"),
    ((130, 130), "bf16", True, "randn"),  # 265 blocks: two 256-blocks of absmax, partial last block
    ((130, 130), "fp16", False, "randn"),
    ((2, 2304), "fp32", True, "randn"),
    ((40, 64), "bf16", True, "outliers"),  # huge values and all-zero blocks
    ((33, 66), "fp16", True, "random_state"),  # arbitrary bytes: every nibble, every 8-bit absmax code
    ((33, 66), "bf16", True, "random_state"),
    ((16, 64), "fp16", False, "ties"),  # products exactly halfway between two fp16 / bf16 numbers
    ((16, 64), "bf16", False, "ties"),
    ((9, 64), "fp32", False, "fp4"),
]
CASE_IDS = ["{}-{}-{}-{}".format("x".join(map(str, s)), d, "dq" if dq else "nodq", k) for s, d, dq, k in CASES]


def make_weight(shape, dtype, double_quant, kind, device="cpu") -> NF4Weight:
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, double_quant, kind)).encode()))
    dt = DTYPES[dtype]
    if kind in ("randn", "outliers", "fp4"):
        w = torch.randn(shape, generator=g) * 0.02
        if kind == "outliers":
            w.view(-1)[::97] = 3e4
            w.view(-1)[64:192] = 0.0  # two all-zero blocks
        q = quantize_4bit(w.to(dt), "fp4" if kind == "fp4" else "nf4", 64, double_quant)
    else:  # build the stored tensors directly
        n = torch.Size(shape).numel()
        nb = -(-n // 64)
        packed = torch.randint(0, 256, (-(-n // 2),), generator=g, dtype=torch.uint8)
        if kind == "ties":
            # |code| = 1 (nibble 0 or 15) times these scales lands exactly halfway between representable values
            halfway = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 2.5 * 2**-24, 1 + 2**-8, 1 + 3 * 2**-8, 3 * 2**-9])
            absmax = halfway[torch.randint(0, len(halfway), (nb,), generator=g)]
            packed = packed & 0xF0 | 0x0F  # low nibble 15 → +1.0
            q = NF4Weight(packed, absmax, None, None, tuple(shape), dt)
        else:  # random_state
            absmax = torch.randint(0, 256, (nb,), generator=g, dtype=torch.uint8)
            scale = torch.rand(-(-nb // 256), generator=g) * 0.1
            q = NF4Weight(packed, absmax, scale, torch.tensor(0.03), tuple(shape), dt)
    for name in ("packed", "absmax", "absmax_scale", "absmax_offset"):
        if getattr(q, name) is not None:
            setattr(q, name, getattr(q, name).to(device))
    return q


def run_cases(device: str, cases=CASES) -> dict:
    """{case id: {"bit_identical": bool, "max_abs_diff": float}} comparing kernel and reference."""
    from minilora.kernels import dequantize, use_triton
    from minilora.kernels.nf4_dequant import dequantize_nf4_triton

    results = {}
    for cid, case in zip(CASE_IDS, cases):
        q = make_weight(*case, device=device)
        ref = dequantize_nf4(q)
        out = dequantize_nf4_triton(q)
        results[cid] = {
            "bit_identical": out.dtype == ref.dtype and out.shape == ref.shape
            and torch.equal(out.view(torch.uint8), ref.view(torch.uint8)),
            "max_abs_diff": (out.float() - ref.float()).abs().max().item(),
            "dispatch_used_kernel": use_triton(q.packed),
            "dispatch_equal": torch.equal(dequantize(q).view(torch.uint8), ref.view(torch.uint8)),
        }
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "cpu"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cid", CASE_IDS)
def test_triton_interpreter_bit_identical_to_reference(interpreter_results, cid):
    r = interpreter_results[cid]
    assert r["bit_identical"], r
    assert r["dispatch_used_kernel"] and r["dispatch_equal"], r  # TRITON_INTERPRET=1 → kernels.dequantize runs it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES + [((4096, 4096), "bf16", True, "randn"), ((1000, 1001), "bf16", True, "randn")])
def test_cuda_kernel_bit_identical_to_reference(case):
    pytest.importorskip("triton", reason="triton is not installed")
    from minilora.kernels.nf4_dequant import dequantize_nf4_triton

    from minilora.kernels import dequantize, use_triton

    q = make_weight(*case, device="cuda")
    ref, out = dequantize_nf4(q), dequantize_nf4_triton(q)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)), (out.float() - ref.float()).abs().max()
    assert use_triton(q.packed) and torch.equal(dequantize(q).view(torch.uint8), ref.view(torch.uint8))  # dispatch
    q_cpu = make_weight(*case, device="cpu")  # and the GPU reference equals the CPU one
    assert torch.equal(ref.cpu().view(torch.uint8), dequantize_nf4(q_cpu).view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 1001)])
def test_quantize_on_cuda_equals_quantize_on_cpu(shape, double_quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16() * 0.02
    q_cpu, q_gpu = quantize_nf4(w, double_quant=double_quant), quantize_nf4(w.cuda(), double_quant=double_quant)
    for name in ("packed", "absmax", "absmax_scale", "absmax_offset"):
        a, b = getattr(q_cpu, name), getattr(q_gpu, name)
        if a is None:
            assert b is None, name
        else:
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.cpu().reshape(-1).view(torch.uint8)), name


def test_dispatch_falls_back_to_reference_on_cpu_without_importing_triton(monkeypatch):
    from minilora import kernels
    from minilora.kernels import dequantize, use_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(kernels, "triton_available", lambda: pytest.fail("use_triton imported triton for a CPU tensor"))
    q = quantize_nf4(torch.randn(8, 64))
    assert not use_triton(q.packed)
    assert torch.equal(dequantize(q), dequantize_nf4(q))
    assert dequantize(q, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("triton_imports", [True, False])
def test_dispatch_picks_the_kernel_for_a_cuda_tensor_when_triton_imports(monkeypatch, triton_imports):
    """use_triton's CUDA branch, on the CPU: OnCuda (tests/cuda_standins.py) is a CPU tensor whose is_cuda is True.
    (The kernel behind that branch runs in the interpreter cases above, through kernels.dequantize.)"""
    from minilora import kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(kernels, "triton_available", lambda: triton_imports)
    assert kernels.use_triton(OnCuda(quantize_nf4(torch.randn(8, 64)).packed)) is triton_imports


def test_dynamic_code_is_what_the_kernel_reads():
    # the kernel takes DYNAMIC_CODE from minilora.nf4: 256 sorted fp32 values, so any uint8 absmax code is valid
    assert DYNAMIC_CODE.dtype == torch.float32 and DYNAMIC_CODE.numel() == 256
    assert torch.all(DYNAMIC_CODE[1:] >= DYNAMIC_CODE[:-1])


if __name__ == "__main__":  # python tests/test_kernels.py [cpu|cuda]: print the case results as one JSON line
    print(json.dumps(run_cases(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
