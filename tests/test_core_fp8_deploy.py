"""Deploy = what QAT trained: FP8Linear (the deployed linear) computes what the FP8FakeQuantLinear it came from
computes - same fp8 weight and activation rounding, same scale math, the bias added after the GEMM on both - equal
on CPU in fp32 (where it takes the F.linear path unless W8A8 is forced), one layer and a whole swapped model."""
import copy

import pytest
import torch
from torch import nn

import lite3r


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


@pytest.mark.parametrize("w8a8", [None, False, True], ids=["default", "f_linear", "forced-scaled_mm"])
@pytest.mark.parametrize("shape", [(64, 96), (24, 40), (1536, 64)], ids=["x16", "odd", "long"])  # odd: F.linear
def test_one_layer_equal(w8a8, shape):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(*shape)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * torch.logspace(-2, 1, shape[0])[None])
        linear.bias.copy_(torch.randn(shape[1], generator=g) * 3.0)  # a large bias: its placement shows
    student = lite3r.FP8FakeQuantLinear.from_linear(linear)
    deployed = lite3r.FP8Linear.from_linear(student)
    deployed.use_scaled_mm = w8a8
    x = torch.randn(3, 37, shape[0], generator=g) * torch.logspace(-3, 2, 37)[:, None]
    with torch.no_grad():
        want, got = student(x), deployed(x)
    w8a8_ran = deployed._w8a8(x)
    assert w8a8_ran == (w8a8 is True and shape != (24, 40) and lite3r._scaled_mm_ok(x.device))
    assert got.dtype == want.dtype == torch.float32
    if w8a8_ran:  # CPU _scaled_mm dequantises and runs a GEMM of its own: fp32 rounding apart at some shapes
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("w8a8", [None, False], ids=["default", "f_linear"])
def test_model_deploy_equals_student(w8a8):
    """A swapped ViT-like model (SLA at a sparse topk, FP8 fake quant): deploy(compile=False) gives the student's
    output exactly, so no FP8 rounding or block choice flips downstream."""
    torch.manual_seed(0)
    dim, heads = 64, 4

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.num_heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.attn = nn.LayerNorm(dim), Attention()
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            x = x + self.attn(self.norm(x))
            return x + self.mlp(x)

    model = nn.Sequential(*[Block() for _ in range(3)])
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    lite3r.swap_attention(model, topk=0.5, block_q=16, block_k=16)
    x = torch.randn(2, 75, dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        deployed = lite3r.deploy(copy.deepcopy(model), compile=False)
        for m in deployed.modules():
            if isinstance(m, lite3r.FP8Linear):
                m.use_scaled_mm = w8a8
        got = deployed(x)
    assert sum(isinstance(m, lite3r.FP8Linear) for m in deployed.modules()) == 3 * 4 and torch.equal(got, want)
