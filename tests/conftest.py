"""Fixtures shared by several test files."""
import pytest


@pytest.fixture
def bnb_reference_cpu_path(monkeypatch):
    """bitsandbytes' CPU Linear4bit switches, at inference on CPUs with AVX512-BF16, to a gemm on a repacked weight
    whose rounding differs from its dequantize + matmul. Parity tests compare with the latter, which every CPU runs
    the same way (the AVX512 path gives differences of about 2e-3 in the logits of a tiny GPT-2)."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)  # read by Linear4bit.__init__
