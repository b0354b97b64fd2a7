"""kernels/fp8.py: bit-exact against lite3r.fp8_quantize's PyTorch definition (forced with LITE3R_BACKEND=torch),
every axis, dtypes, all-zero rows, e4m3 subnormal magnitudes, rounding ties, rows longer than one tile."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lite3r

kernels = pytest.importorskip("lite3r_kernels")
if not kernels.AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def torch_reference(monkeypatch):
    """lite3r.fp8_quantize itself dispatches to the kernels when it can: pin it to its PyTorch definition."""
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def assert_same_quant(x: torch.Tensor, axis: int) -> None:
    got, scale = kernels.fp8_quantize(x, axis=axis)
    want, want_scale = lite3r.fp8_quantize(x, axis=axis)
    assert got.dtype == torch.float8_e4m3fn and got.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == want_scale.shape
    assert torch.equal(scale, want_scale)
    assert torch.equal(bits(got), bits(want)), f"{int((bits(got) != bits(want)).sum())} codes differ"
    dq = kernels.fp8_fake_quant(x, axis=axis)
    assert dq.dtype == x.dtype and torch.equal(dq, lite3r.fp8_fake_quant(x, axis=axis))


@settings(max_examples=15, deadline=None)
@given(shape=st.lists(st.integers(1, 12), min_size=1, max_size=3), data=st.data(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), log_scale=st.floats(-12, 12),
       seed=st.integers(0, 2**16))
def test_fp8_bit_exact(shape, data, dtype, log_scale, seed):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 2.0 ** log_scale).to(dtype)
    if x.numel() > 4:
        x.view(-1)[:3] = 0.0  # zero entries (and often an all-zero slice)
    assert_same_quant(x.to(DEVICE), axis)


def test_fp8_every_rounding_case():
    """All e4m3 ties and exponent carries: a dense sweep of x / scale over [-448, 448] and the subnormal range
    (scale pinned to 1 by a 448 in every row)."""
    sweep = torch.cat([torch.linspace(-448, 448, 40001), torch.linspace(-0.05, 0.05, 4001)])
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[torch.isfinite(codes)]
    mids = (codes.sort().values[1:] + codes.sort().values[:-1]) / 2  # exact ties between neighbours
    x = torch.cat([sweep, mids, codes]).view(1, -1)
    x = torch.cat([x, torch.full((1, 1), 448.0)], dim=1)
    assert_same_quant(x.to(DEVICE), -1)


def test_fp8_long_rows_and_zero_rows():
    """Rows longer than the one-pass tile (two-pass loop), and all-zero rows (scale 1e-12/448, zeros out)."""
    x = torch.randn(3, 8192 + 77)
    x[1] = 0.0
    assert_same_quant(x.to(DEVICE), -1)
    q, scale = kernels.fp8_quantize(x.to(DEVICE), axis=-1)
    assert float(scale[1]) == pytest.approx(1e-12 / 448) and not q[1].float().any()


def test_fp8_fake_quant_is_straight_through():
    x = torch.randn(5, 64, device=DEVICE, requires_grad=True)
    g = torch.randn(5, 64, device=DEVICE)
    (grad,) = torch.autograd.grad((kernels.fp8_fake_quant(x, axis=0) * g).sum(), x)
    assert torch.equal(grad, g)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_fp8_rejects_non_finite(bad):
    x = torch.randn(4, 32, device=DEVICE)
    x[2, 5] = bad
    with pytest.raises(ValueError, match="inf/NaN"):
        kernels.fp8_quantize(x, axis=-1)
    with pytest.raises(ValueError, match="inf/NaN"):
        kernels.fp8_fake_quant(x, axis=-1)


def test_fp8_rejects_bad_axis():
    with pytest.raises(ValueError, match="axis 2"):
        kernels.fp8_quantize(torch.randn(3, 4, device=DEVICE), axis=2)


def test_opcheck_fp8_ops():
    utils = {} if DEVICE == "cuda" else {"test_utils": ("test_schema", "test_autograd_registration")}
    torch.library.opcheck(torch.ops.lite3r.fp8_quantize_rows.default, (torch.randn(4, 40, device=DEVICE),), **utils)
    torch.library.opcheck(torch.ops.lite3r.fp8_fake_quant_rows.default,
                          (torch.randn(4, 40, device=DEVICE, requires_grad=True),), **utils)


@pytest.mark.gpu
def test_fp8_compiled_equals_eager_gpu():
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    eager = kernels.fp8_quantize(x, axis=-1)
    compiled = torch.compile(lambda t: kernels.fp8_quantize(t, axis=-1), fullgraph=True)(x)
    assert torch.equal(bits(eager[0]), bits(compiled[0])) and torch.equal(eager[1], compiled[1])
    assert_same_quant(x, -1)
