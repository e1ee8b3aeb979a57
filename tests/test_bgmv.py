"""The Triton BGMV kernel (minilora/kernels/bgmv.py) equals minilora.serve.bgmv_reference, the per-token gather.

On CPU the kernel runs in Triton's interpreter. TRITON_INTERPRET is read when @triton.jit decorates the kernel,
so the interpreter cases run in one subprocess (this file as a script) with the variable set, and the rest of
the pytest process never sees it (as tests/test_kernels.py). On a CUDA machine the same cases, and larger ones,
run on the GPU. The server's choice of backend for a base on CUDA runs on the CPU too, with an OnCuda embedding
(tests/cuda_standins.py: is_cuda says True).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from cuda_standins import OnCuda

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}  # relative to the largest |y|

# (N tokens, ranks per slot, R, d_in, d_out, dtype, block_k, block_n, fill past rank); a rank-0 slot is "none"
CASES = {
    "hetero-fp32": (9, [6, 1, 3, 0, 5], 6, 40, 70, "fp32", 16, 32, 0.0),  # R, d_in, d_out not powers of 2
    "padding-never-read": (7, [4, 2, 8, 0], 8, 24, 36, "fp32", 16, 16, float("nan")),  # NaN past each rank
    "one-block": (5, [16, 8, 4, 0], 16, 32, 96, "fp32", 128, 128, 0.0),
    "fp16": (6, [8, 3, 0], 8, 48, 40, "fp16", 16, 16, 0.0),
    "bf16": (6, [8, 3, 0], 8, 48, 40, "bf16", 16, 16, 0.0),
}


def make_case(N, ranks, R, d_in, d_out, dtype, fill, device="cpu", seed=0):
    """x (N, d_in), a pool A (S, R, d_in), B (S, d_out, R) whose entries past each slot's rank are `fill`, the
    same pool zero-padded (what the reference reads), scaling, rank, slots (every slot, the null one included)."""
    g = torch.Generator().manual_seed(seed)
    S = len(ranks)
    A, B = torch.randn(S, R, d_in, generator=g), torch.randn(S, d_out, R, generator=g)
    past = torch.arange(R)[None, :] >= torch.tensor(ranks)[:, None]  # (S, R): rows/columns past the rank
    A0, B0 = A.masked_fill(past[:, :, None], 0), B.masked_fill(past[:, None, :], 0)
    A, B = A.masked_fill(past[:, :, None], fill), B.masked_fill(past[:, None, :], fill)
    scaling = torch.rand(S, generator=g) + 0.5
    slots = torch.cat([torch.arange(S), torch.randint(0, S, (N - S,), generator=g)])[torch.randperm(N, generator=g)]
    x = torch.randn(N, d_in, generator=g)
    dt = DTYPES[dtype]
    to = lambda t: t.to(device=device, dtype=dt)  # noqa: E731
    return (to(x), to(A), to(B), to(A0), to(B0), to(scaling), torch.tensor(ranks, dtype=torch.int32, device=device),
            slots.to(device))


def run_cases(device: str) -> dict:
    """{case: {"max_rel_err", "finite", "null_rows_zero"}} kernel vs reference, then the server's two backends."""
    from minilora.kernels.bgmv import bgmv_triton
    from minilora.serve import bgmv_reference

    results = {}
    for cid, (N, ranks, R, d_in, d_out, dtype, bk, bn, fill) in CASES.items():
        x, A, B, A0, B0, s, rank, slots = make_case(N, ranks, R, d_in, d_out, dtype, fill, device)
        out = bgmv_triton(x, A, B, s, rank, slots, block_k=bk, block_n=bn)
        ref = bgmv_reference(x.double(), A0.double(), B0.double(), s.double(), slots)  # fp64 oracle
        results[cid] = {"max_rel_err": ((out.double() - ref).abs().max() / ref.abs().max()).item(),
                        "finite": bool(torch.isfinite(out).all()), "dtype_ok": out.dtype == x.dtype,
                        "null_rows_zero": bool((out[rank[slots] == 0] == 0).all())}  # rank-0 slots add 0
    results["server"] = server_case(device)
    return results


def server_case(device: str) -> dict:
    """LoRAServer with backend "auto" (the kernel here) against backend "torch": a mixed LoRA/DoRA batch's logits,
    and greedy KV-cache generation."""
    import copy

    from minilora import GPT, GPTConfig, LoRAConfig, attach
    from minilora.dora import DoRAConfig
    from minilora.serve import LoRAServer

    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=16)).eval().to(device)
    servers = [LoRAServer(base, n_slots=3, max_rank=8, backend=b) for b in ("auto", "torch")]
    for i, cfg in enumerate([LoRAConfig(r=8, targets="all-linear"), LoRAConfig(r=2), DoRAConfig(r=4)]):
        model = attach(copy.deepcopy(base), cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(device) * 0.3)
        for s in servers:
            s.add(f"a{i}", model)
    rows, x = ["a0", None, "a2", "a1"], torch.randint(0, 32, (4, 3), generator=torch.Generator().manual_seed(1))
    (k, kernel_out), (_, torch_out) = [(s.backend, s.forward(x, rows)) for s in servers]
    gens = [s.generate([[1, 2], [3], [4, 5, 6], [7]], rows, max_new_tokens=3) for s in servers]
    return {"backend": k, "max_abs_diff": (kernel_out - torch_out).abs().max().item(), "same_tokens": gens[0] == gens[1]}


@pytest.fixture(scope="module")
def interpreter_results():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "cpu"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cid", list(CASES))
def test_triton_interpreter_equals_gather_reference(interpreter_results, cid):
    r = interpreter_results[cid]
    assert r["finite"] and r["dtype_ok"] and r["null_rows_zero"], r  # NaN past the rank is never read
    assert r["max_rel_err"] < TOL[CASES[cid][5]], r


def test_server_triton_backend_equals_torch_backend(interpreter_results):
    r = interpreter_results["server"]
    assert r["backend"] == "triton", r  # TRITON_INTERPRET=1: "auto" picks the kernel
    assert r["max_abs_diff"] < 1e-5 and r["same_tokens"], r


def test_auto_backend_is_torch_on_cpu(monkeypatch):
    from minilora import GPT, GPTConfig
    from minilora.serve import LoRAServer

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert LoRAServer(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=16))).backend == "torch"


@pytest.mark.parametrize("triton_imports, backend", [(True, "triton"), (False, "torch")])
def test_auto_backend_is_the_kernel_for_a_cuda_base_when_triton_imports(monkeypatch, triton_imports, backend):
    """LoRAServer's "auto" for a base on CUDA, on the CPU: the embedding (whose device the server reads) replaced by
    an OnCuda (tests/cuda_standins.py), a CPU tensor whose is_cuda is True."""
    from minilora import GPT, GPTConfig, kernels
    from minilora.serve import LoRAServer

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(kernels, "triton_available", lambda: triton_imports)
    base = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=16))
    base.transformer.wte.weight = OnCuda(base.transformer.wte.weight.detach())
    assert LoRAServer(base).backend == backend


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_equals_reference():
    pytest.importorskip("triton", reason="triton is not installed")
    results = run_cases("cuda")
    for cid, r in results.items():
        if cid != "server":
            assert r["finite"] and r["null_rows_zero"] and r["max_rel_err"] < TOL[CASES[cid][5]] * 10, (cid, r)
    assert results["server"]["max_abs_diff"] < 1e-3 and results["server"]["same_tokens"], results["server"]
    from minilora.kernels.bgmv import bgmv_triton
    from minilora.serve import bgmv_reference

    # decode-sized: 1024 tokens, 1000 adapters of ranks 4..64 padded to 64, GPT-2's c_attn (768 -> 2304)
    ranks = [4, 8, 16, 32, 64] * 200 + [0]
    x, A, B, A0, B0, s, rank, slots = make_case(1024, ranks, 64, 768, 2304, "fp32", 0.0, "cuda")
    out = bgmv_triton(x, A, B, s, rank, slots)
    ref = bgmv_reference(x.double(), A0.double(), B0.double(), s.double(), slots)
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4


if __name__ == "__main__":  # python tests/test_bgmv.py [cpu|cuda]: the case results as one JSON line
    print(json.dumps(run_cases(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
