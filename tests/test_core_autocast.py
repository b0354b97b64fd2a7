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
