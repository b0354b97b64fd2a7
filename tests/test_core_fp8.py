"""lite3r.py FP8: the scale contract, round-trip error bounds, STE, errors, and the two linears (QAT fake quant vs
deployed FP8Linear on both paths: W8A8 torch._scaled_mm and weight-only)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lite3r

E4M3 = torch.float8_e4m3fn
CPU = ("cpu", None)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


def _contract(x, axis):
    """The scale math of docs/architecture.md, spelled out: kernels must match it bit for bit."""
    xf = x.float()
    scale = torch.clamp(xf.abs().amax(dim=axis, keepdim=True), min=1e-12) / 448
    return torch.clamp(xf / scale, -448, 448).to(E4M3), scale


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), axis_pick=st.integers(0, 5),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), log_mag=st.integers(-20, 4),
       seed=st.integers(0, 2 ** 16))
def test_fp8_round_trip(shape, axis_pick, dtype, log_mag, seed):
    axis = axis_pick % len(shape) - (len(shape) if axis_pick >= len(shape) else 0)  # positive and negative axes
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2.0 ** log_mag).to(dtype)
    x = x * (torch.rand(shape, generator=g) > 0.2)  # exact zeros among the values
    x_fp8, scale = lite3r.fp8_quantize(x, axis=axis)
    ref_fp8, ref_scale = _contract(x, axis)
    assert x_fp8.dtype == E4M3 and scale.dtype == torch.float32 and scale.shape[axis] == 1
    assert torch.equal(x_fp8.view(torch.uint8), ref_fp8.view(torch.uint8)) and torch.equal(scale, ref_scale)

    dq = lite3r.fp8_fake_quant(x, axis=axis)
    assert dq.dtype == dtype and dq.shape == x.shape
    assert torch.equal(dq, (x_fp8.float() * scale).to(dtype))
    assert bool((dq[x == 0] == 0).all())  # exact zeros stay zero
    xf, err = x.float(), (dq.float() - x.float()).abs()
    normal = xf.abs() >= scale * 2 ** -6  # e4m3's normal range: 3 mantissa bits, relative error <= 2^-4
    fin = torch.finfo(dtype)  # + the final rounding into bf16/fp16 (relative, and absolute among its subnormals)
    out_round = (0 if dtype == torch.float32 else 2 ** -8) * xf.abs() + fin.smallest_normal * fin.eps
    assert bool((err <= 2 ** -4 * xf.abs() + out_round)[normal].all()), float((err / xf.abs())[normal].max())
    sub_bound = scale * 2 ** -10 * 1.05 + out_round  # e4m3 subnormals: absolute error <= half their spacing
    assert bool((err <= sub_bound)[~normal].all())
    # the largest magnitude of each slice lands on +-448 exactly
    assert bool((x_fp8.float().abs().amax(dim=axis) == 448).logical_or(x.abs().amax(dim=axis) == 0).all())


def test_all_zero_rows_and_extremes():
    x = torch.zeros(3, 32)
    x[1] = torch.linspace(-1e4, 1e4, 32)
    x[2, 5] = 1e-30  # a row whose amax is below the 1e-12 clamp flushes to zero
    dq = lite3r.fp8_fake_quant(x, axis=-1)
    assert torch.equal(dq[0], torch.zeros(32)) and torch.equal(dq[2], torch.zeros(32))
    torch.testing.assert_close(dq[1], x[1], rtol=2 ** -4, atol=0)
    _, scale = lite3r.fp8_quantize(x, axis=-1)
    assert scale[0, 0] == torch.tensor(1e-12) / 448


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ste_gradient_is_upstream(dtype):
    x = (torch.randn(5, 7, 48) * 3).to(dtype).requires_grad_()
    g = torch.randn(5, 7, 48).to(dtype)
    y = lite3r.fp8_fake_quant(x, axis=1)
    assert torch.equal(y, lite3r.fp8_fake_quant(x.detach(), axis=1)) and not torch.equal(y, x)  # quantised values
    y.backward(g)
    assert x.grad.dtype == dtype and torch.equal(x.grad, g)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fn", [lite3r.fp8_quantize, lite3r.fp8_fake_quant], ids=["quantize", "fake_quant"])
def test_nonfinite_raises(bad, fn):
    x = torch.randn(4, 16)
    x[2, 3] = bad
    with pytest.raises(ValueError, match="inf/NaN"):
        fn(x, axis=-1)


# -------------------------------------------------------------------------------------------------- linears
def test_fake_quant_linear_is_a_linear():
    lin = nn.Linear(32, 48)
    fq = lite3r.FP8FakeQuantLinear.from_linear(lin)
    assert isinstance(fq, nn.Linear) and fq.weight is lin.weight and fq.bias is lin.bias
    assert list(fq.state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 5, 32, requires_grad=True)
    y = fq(x)
    ref = F.linear(lite3r.fp8_fake_quant(x, axis=-1), lite3r.fp8_fake_quant(lin.weight, axis=-1), lin.bias)
    assert torch.equal(y, ref) and not torch.allclose(y, lin(x), rtol=0, atol=1e-5)
    y.sum().backward()  # STE reaches the input and the weight
    assert x.grad is not None and lin.weight.grad is not None


def _pair(in_f, out_f, seed=0):
    torch.manual_seed(seed)
    qat = nn.Sequential(nn.Linear(in_f, out_f))
    lite3r.convert_to_fp8_qat(qat, filter=lambda m, fqn: True)  # no attention here: swap_attention would refuse
    assert isinstance(qat[0], lite3r.FP8FakeQuantLinear)
    dep = lite3r.to_fp8_inference(copy.deepcopy(qat))
    assert isinstance(dep[0], lite3r.FP8Linear)
    return qat, dep


def test_fp8_linear_state():
    qat, dep = _pair(64, 32)
    lin = dep[0]
    assert sorted(lin.state_dict()) == ["bias", "weight", "weight_scale"]
    assert lin.weight.dtype == E4M3 and lin.weight.shape == (32, 64)
    assert lin.weight_scale.dtype == torch.float32 and lin.weight_scale.shape == (32,)
    assert torch.equal(lin.dequantized_weight(), lite3r.fp8_fake_quant(qat[0].weight.detach(), axis=-1))
    assert torch.equal(lin.bias, qat[0].bias.detach())
    assert not list(lin.parameters())  # nothing trainable in deployment


@pytest.mark.parametrize("shape", [(7, 64), (2, 5, 64), (1, 64)], ids=["tokens", "batch", "one-token"])
def test_fp8_linear_w8a8_matches_fake_quant(monkeypatch, shape):
    """W8A8: (x8 w8^T) * sx * sw in fp32 vs fake quant's dq(x) dq(w)^T: the same products, fp32 rounding apart."""
    if not lite3r._scaled_mm_ok(torch.device("cpu")):
        pytest.skip("this torch build has no CPU torch._scaled_mm for e4m3")
    qat, dep = _pair(64, 48)
    dep[0].use_scaled_mm = True  # on CPU only when asked (by default CPU runs the student's F.linear path)
    x = torch.randn(*shape) * 4
    if x.numel() > 64:
        x.view(-1, 64)[0] = 0.0  # an all-zero token: clamped scale, output = bias
    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        out, ref = dep(x), qat(x)
    assert calls, "the W8A8 path did not run"
    assert out.shape == (*shape[:-1], 48) and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if x.numel() > 64:
        torch.testing.assert_close(out.view(-1, 48)[0], qat[0].bias.detach(), rtol=0, atol=0)
    # and it is W8A8, not weight-only: activations were quantised
    weight_only = F.linear(x, dep[0].dequantized_weight(), dep[0].bias)
    assert (out - weight_only).abs().max() > 1e-4


@pytest.mark.parametrize("in_f, out_f, force", [(64, 48, True), (40, 48, False), (64, 24, False)],
                         ids=["forced", "in-not-16", "out-not-16"])
def test_fp8_linear_weight_only(monkeypatch, in_f, out_f, force):
    """Without W8A8: F.linear(fake-quantised x, dequantised fp8 weight) + bias, the fake-quant student exactly."""
    qat, dep = _pair(in_f, out_f)
    if force:
        monkeypatch.setitem(lite3r._SCALED_MM, CPU, False)  # as on a machine without it
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: pytest.fail("W8A8 path taken"))
    x = torch.randn(3, 4, in_f)
    with torch.no_grad():
        out, ref = dep(x), qat(x)
        exact = F.linear(lite3r.fp8_fake_quant(x, axis=-1), lite3r.fp8_fake_quant(qat[0].weight, axis=-1)) + qat[0].bias
    assert torch.equal(out, exact) and torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_linear_low_precision_io(dtype):
    qat, dep = _pair(32, 32)
    x = torch.randn(6, 32, dtype=dtype)
    with torch.no_grad():
        out = dep(x)
        ref = qat.to(dtype)(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.05, atol=0.05)


def test_fp8_linear_keeps_its_format_under_to():
    """model.to(bf16) / .half() cast floating buffers, float8 included: FP8Linear keeps fp8 weight + fp32 scale."""
    qat, dep = _pair(32, 16)
    w, s = dep[0].weight.clone(), dep[0].weight_scale.clone()
    x = torch.randn(4, 32)
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float(), lambda m: m.to("cpu")):
        m = cast(copy.deepcopy(dep))[0]
        assert m.weight.dtype == E4M3 and torch.equal(m.weight.view(torch.uint8), w.view(torch.uint8))
        assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, s)
        assert list(m.state_dict()) == ["weight", "weight_scale", "bias"]
    m = dep.to(torch.bfloat16)
    assert m[0].bias.dtype == torch.bfloat16 and m(x.bfloat16()).dtype == torch.bfloat16
