"""pytest-benchmark of the kernels at sizes the CPU interpreter can run (and real sizes on a GPU).

    python -m pytest benchmarks/bench_kernels.py --benchmark-only
On CPU these time Triton's interpreter (a correctness tool, not a speed one): useful only to catch regressions in
launch overhead. The GPU numbers in docs/benchmarks.md come from benchmarks/gpu_kernels.py (kernels.bench.run)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

kernels = pytest.importorskip("lite3r_kernels")
if not kernels.AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
N = 32 * 1374 if CUDA else 256
H = 16 if CUDA else 1
DTYPE = torch.bfloat16 if CUDA else torch.float32


def _sync(fn):
    def run():
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        return out

    return run


@pytest.fixture(scope="module")
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, N, 64, generator=g).to(DEVICE, DTYPE) for _ in range(3)]


def test_bench_sla_forward(benchmark, qkv):
    q, k, v = qkv
    o_s, o_l = benchmark(_sync(lambda: kernels.sla_branches(q, k, v, topk=0.05, block_q=64, block_k=64)))
    assert o_s.shape == q.shape and torch.isfinite(o_s.float()).all() and torch.isfinite(o_l.float()).all()


def test_bench_block_map(benchmark, qkv):
    q, k, _ = qkv
    lut = benchmark(_sync(lambda: kernels.sla_block_map(q, k, topk=0.05, block_q=64, block_k=64)))
    assert lut.shape[:3] == (1, H, -(-N // 64))


def test_bench_fp8_quantize(benchmark):
    x = torch.randn(N, 1024, device=DEVICE, dtype=DTYPE)
    x_fp8, scale = benchmark(_sync(lambda: kernels.fp8_quantize(x, axis=-1)))
    assert x_fp8.dtype == torch.float8_e4m3fn and scale.shape == (N, 1)
