"""torch.compile(fullgraph=True) of lite3r.sla_attention on its PyTorch reference path (LITE3R_BACKEND=torch), on
the CPU: one graph (no graph break anywhere: the typed() wrapper, the backend read, the block map, both branches
and proj_l), and the compiled forward and backward equal eager to fp32 rounding. N = 200 leaves a partial last
block; small shapes keep inductor's CPU compile short."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import lite3r


def _loss_and_grads(fn, q, k, v, proj_l, g):
    out = fn(q, k, v)
    grads = torch.autograd.grad((out * g).sum(), (q, k, v, proj_l.weight, proj_l.bias))
    return out, grads


@pytest.mark.parametrize("feature_map", ["softmax", "elu"])
def test_sla_attention_compiles_fullgraph_and_matches_eager(monkeypatch, feature_map):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    B, H, N, D = 1, 2, 200, 16
    q, k, v = (torch.randn(B, H, N, D, generator=gen).requires_grad_() for _ in range(3))
    g = torch.randn(B, H, N, D, generator=gen)
    proj_l = torch.nn.Linear(D, D)
    with torch.no_grad():
        proj_l.weight.copy_(torch.randn(D, D, generator=gen) / D ** 0.5)  # a real linear branch, not ~zero

    def attn(q, k, v):
        return lite3r.sla_attention(q, k, v, topk=0.3, block_q=32, block_k=32, feature_map=feature_map,
                                    proj_l=proj_l)

    eager, g_eager = _loss_and_grads(attn, q, k, v, proj_l, g)
    counter = CompileCounterWithBackend("inductor")
    compiled, g_comp = _loss_and_grads(torch.compile(attn, backend=counter, fullgraph=True), q, k, v, proj_l, g)
    assert counter.frame_count == 1, f"{counter.frame_count} frames compiled: the call did not go through one graph"
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-5), float((compiled - eager).abs().max())
    for name, a, b in zip(["dq", "dk", "dv", "d proj_l.weight", "d proj_l.bias"], g_comp, g_eager):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (name, float((a - b).abs().max()))
    # the sparse branch alone differs from the output: proj_l's branch is really in what was compared
    o_s = lite3r.sla_attention(q, k, v, topk=0.3, block_q=32, block_k=32, feature_map=feature_map)
    assert not torch.allclose(o_s, eager, atol=1e-3)
