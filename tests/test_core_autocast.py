"""sla_attention under autocast: q/k come out of fp32 norms/RoPE while v is bf16; like SDPA it must cast all three
to the autocast dtype (and refuse mixed dtypes outside autocast with a clear error)."""
import pytest
import torch
import torch.nn.functional as F

import lite3r


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


def test_mixed_dtypes_under_autocast_match_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 96, 16, generator=g), torch.randn(1, 2, 96, 16, generator=g)
    v = torch.randn(1, 2, 96, 16, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lite3r.sla_attention(q, k, v, topk=1.0, block_q=32, block_k=32)
        ref = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_mixed_dtypes_outside_autocast_is_a_clear_error():
    q = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="share one dtype"):
        lite3r.sla_attention(q, q, q.bfloat16(), topk=1.0)


def test_all_fp32_under_autocast_runs_in_the_autocast_dtype_like_sdpa():
    """fp32 q, k, v (e.g. out of an FP8 linear fed by a LayerNorm) under autocast: SDPA computes in bf16, so must SLA
    (on the GPU, fp32 would also take the kernels' slow full-fp32 path)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=g) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lite3r.sla_attention(q, k, v, topk=1.0, block_q=32, block_k=32)
        ref = F.scaled_dot_product_attention(q, k, v)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_fp8_linear_returns_the_autocast_dtype_like_nn_linear():
    lin = torch.nn.Linear(32, 48)
    fp8 = lite3r.FP8Linear.from_linear(lin)
    x = torch.randn(5, 32)  # fp32, as a LayerNorm returns it under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == fp8(x).dtype == torch.bfloat16
    assert fp8(x).dtype == torch.float32
