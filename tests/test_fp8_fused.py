"""kernels/fp8_fused.py (LayerNorm / GELU + per-token FP8 quantise in one kernel) against its PyTorch twins, and
lite3r.fuse_fp8_inputs (the deploy path's use of it): exact where PyTorch computes, state dicts unchanged, and only
where modules declare the dataflow. On CPU the kernels run in Triton's interpreter; tests named *gpu* need CUDA."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lite3r
from lite3r_backbones.layers import Block

kernels = pytest.importorskip("lite3r_kernels")
if not kernels.AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)
from lite3r_kernels.fp8_fused import gelu_fp8_reference, layer_norm_fp8_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E4M3 = torch.float8_e4m3fn
# how far the op's output may sit from torch's, relative: bf16 / fp16 outputs are rounded, so one ulp of a value
# that lands on the other side of a tie; fp32 ones a few ulp (LayerNorm: times the row's conditioning, below)
OP_RTOL = {torch.float32: 4 * 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def conditioning(x: torch.Tensor) -> torch.Tensor:
    """1 + |mean| / std per row [M, 1]: how much a LayerNorm's rounding grows (torch's CPU kernel computes
    x * rstd - mean * rstd, which cancels where the mean dwarfs the spread)."""
    xd = x.reshape(-1, x.shape[-1]).double()
    return (1 + xd.mean(-1, keepdim=True).abs() / xd.std(-1, correction=0, keepdim=True).clamp_min(1e-30)).float()


def assert_close_quant(got, want, op_dtype, numel_codes_may_differ=0.01, cond=1.0, ulps=4):
    """Scales within `ulps` fp32 ulp x the row's conditioning (or one ulp of a rounded op dtype); dequantised values
    within one e4m3 step; at most a small fraction of codes different."""
    (q, s), (qr, sr) = got, want
    assert q.dtype == E4M3 and q.shape == qr.shape and s.dtype == torch.float32 and s.shape == sr.shape == \
        (q.shape[0], 1)
    fp32_rtol = ulps * 2.0**-23
    rtol = torch.clamp(torch.as_tensor(cond, device=s.device) * fp32_rtol, min=max(OP_RTOL[op_dtype], fp32_rtol))
    rel = (s - sr).abs() / sr
    assert bool((rel <= rtol).all()), f"scales differ by {float(rel.max()):.3g} relative"
    dq, dqr = q.float() * s, qr.float() * sr
    # one e4m3 step at the value (2**-3 relative; 2**-9 * scale for subnormals), plus what the scale moved
    tol = 0.125 * dqr.abs() + 2.0**-9 * sr + 448.0 * (s - sr).abs()
    assert bool((dq - dqr).abs().le(tol).all()), f"max error {float((dq - dqr).abs().max()):.3g}"
    differ = int((q.view(torch.uint8) != qr.view(torch.uint8)).sum())
    assert differ <= max(2, numel_codes_may_differ * q.numel()), f"{differ} of {q.numel()} codes differ"


ROW_LENGTHS = [1, 2, 7, 16, 63, 100, 257, 1024]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _x(lead, C, dtype, log_scale, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    return ((torch.randn(*lead, C, generator=gen) + shift) * 2.0**log_scale).to(dtype).to(DEVICE)


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), C=st.sampled_from(ROW_LENGTHS),
       dtype=st.sampled_from(DTYPES), ln_fp32=st.booleans(), affine=st.sampled_from(["wb", "w", "none"]),
       eps=st.sampled_from([1e-6, 1e-5]), log_scale=st.floats(-8, 8), shift=st.floats(-2, 2),
       seed=st.integers(0, 2**16))
def test_layer_norm_fp8_matches_reference(lead, C, dtype, ln_fp32, affine, eps, log_scale, shift, seed):
    # C >= 2: a one-value row normalises to exactly 0, which torch's CPU LayerNorm (x * rstd - mean * rstd) misses
    # by rounding noise that then sets the row's scale
    C = max(C, 2)
    x = _x(lead, C, dtype, log_scale, shift, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    w = (1 + torch.randn(C, generator=gen)).to(dtype).to(DEVICE) if affine != "none" else None
    b = torch.randn(C, generator=gen).to(dtype).to(DEVICE) if affine == "wb" else None
    ln_dtype = torch.float32 if ln_fp32 else dtype
    got = kernels.layer_norm_fp8(x, w, b, eps=eps, ln_dtype=ln_dtype)
    assert_close_quant(got, layer_norm_fp8_reference(x, w, b, eps=eps, ln_dtype=ln_dtype), ln_dtype,
                       cond=conditioning(x).to(DEVICE))


@settings(max_examples=25, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=1, max_size=2), C=st.sampled_from(ROW_LENGTHS),
       dtype=st.sampled_from(DTYPES), log_scale=st.floats(-8, 6), seed=st.integers(0, 2**16))
def test_gelu_fp8_matches_reference(lead, C, dtype, log_scale, seed):
    x = _x(lead, C, dtype, log_scale, 0.0, seed)
    # one value >= 0.1 per row: a row of only very negative inputs has GELU outputs made of the cancellation in
    # 1 + erf(x / sqrt 2), where two erf implementations disagree in every digit (and so does the fp32 truth)
    x[..., 0] = x[..., 0].abs() + 0.1
    assert_close_quant(kernels.gelu_fp8(x), gelu_fp8_reference(x), dtype)


def test_zero_rows_and_shapes():
    """All-zero rows (LayerNorm: the bias, or zeros; GELU: zeros) get scale 1e-12/448 and zero codes; any leading
    shape is flattened to rows; fp32 output of a bf16 input."""
    x = torch.randn(2, 3, 64, device=DEVICE, dtype=torch.bfloat16)
    x[0, 1] = 0
    q, s = kernels.layer_norm_fp8(x, None, None, eps=1e-6, ln_dtype=torch.float32)
    assert q.shape == (6, 64) and s.shape == (6, 1)
    assert float(s[1]) == pytest.approx(1e-12 / 448) and not q[1].float().any()
    q, s = kernels.gelu_fp8(x)
    assert float(s[1]) == pytest.approx(1e-12 / 448) and not q[1].float().any()
    assert_close_quant(kernels.gelu_fp8(x), gelu_fp8_reference(x), torch.bfloat16)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_raises(bad):
    x = torch.randn(3, 16, device=DEVICE)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="inf/NaN"):
        kernels.layer_norm_fp8(x, None, None, eps=1e-6)
    with pytest.raises(ValueError, match="inf/NaN"):
        kernels.gelu_fp8(x)


def test_opcheck():
    """Schema and autograd registration everywhere; fake-tensor and AOT dispatch need CUDA (the interpreter cannot
    run on fake tensors)."""
    x = torch.randn(5, 48, device=DEVICE, dtype=torch.bfloat16)
    w, b = torch.randn(48, device=DEVICE), torch.randn(48, device=DEVICE)
    kw = {} if DEVICE == "cuda" else {"test_utils": ("test_schema", "test_autograd_registration")}
    torch.library.opcheck(torch.ops.lite3r.layer_norm_fp8_rows.default, (x, w, b, 1e-6, torch.float32), **kw)
    torch.library.opcheck(torch.ops.lite3r.layer_norm_fp8_rows.default, (x, None, None, 1e-5, torch.bfloat16), **kw)
    torch.library.opcheck(torch.ops.lite3r.gelu_fp8_rows.default, (x,), **kw)


# --------------------------------------------------------------------------------------- lite3r.fuse_fp8_inputs
class Net(nn.Module):
    """Two pre-norm Blocks (lite3r_backbones.layers) between linears: what fuse_fp8_inputs rewires."""

    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList([Block(dim, heads, init_values=0.5) for _ in range(2)])
        self.out = nn.Linear(dim, 16)

    def forward(self, x):
        x = self.inp(x)
        for blk in self.blocks:
            x = blk(x)
        return self.out(x)


class PostNorm(nn.Module):
    """Same child names, other dataflow (x + norm1(attn(x))) and no declaration: must be left alone."""

    def __init__(self, dim=32):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Block(dim, 2).attn

    def forward(self, x):
        return x + self.norm1(self.attn(x))


def deployed(model):
    lite3r.convert_to_fp8_qat(model)
    return lite3r.to_fp8_inference(model).eval()


def test_fuse_keeps_keys_and_is_exact_on_the_pytorch_path():
    torch.manual_seed(0)
    net = deployed(Net())
    x = torch.randn(2, 37, 32)
    with torch.no_grad():
        want = net(x)
    keys = {k: v.clone() for k, v in net.state_dict().items()}
    assert lite3r.fuse_fp8_inputs(net) == 6  # per block: norm1 -> qkv, norm2 -> fc1, GELU -> fc2
    assert lite3r.fuse_fp8_inputs(net) == 0  # idempotent
    blk = net.blocks[0]
    assert isinstance(blk.norm1, lite3r.FusedLayerNorm) and isinstance(blk.mlp.act, lite3r.FusedGELU)
    assert (blk.attn.qkv.input_op, blk.mlp.fc1.input_op, blk.mlp.fc2.input_op) == ("layer_norm", "layer_norm", "gelu")
    assert net.inp.input_op is None and net.out.input_op is None
    state = net.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], keys[k]) for k in keys)
    with torch.no_grad():
        assert torch.equal(net(x), want)  # CPU: the weight-only path runs the moved ops in PyTorch, bit for bit
    copied = copy.deepcopy(net)  # the linear's LayerNorm is the copy's own norm1
    assert copied.blocks[0].attn.qkv._input_norm[0] is copied.blocks[0].norm1


def test_fuse_needs_a_declared_dataflow():
    post = PostNorm()
    lite3r.convert_to_fp8_qat(post)
    post = lite3r.to_fp8_inference(post)
    assert lite3r.fuse_fp8_inputs(post) == 0 and type(post.norm1) is nn.LayerNorm


def test_fuse_through_sla_attention():
    """SLAAttention reads its input through qkv alone: the fusion reaches through it."""
    torch.manual_seed(0)
    net = Net()
    lite3r.swap_attention(net, topk=0.5, block_q=16, block_k=16)
    net = lite3r.to_fp8_inference(net).eval()
    x = torch.randn(1, 40, 32)
    with torch.no_grad():
        want = net(x)
    assert lite3r.fuse_fp8_inputs(net) == 6 and isinstance(net.blocks[1].attn, lite3r.SLAAttention)
    with torch.no_grad():
        assert torch.equal(net(x), want)


def _w8a8(net):
    for m in net.modules():
        if isinstance(m, lite3r.FP8Linear):
            m.use_scaled_mm = True
    return net


@pytest.mark.skipif(not lite3r._scaled_mm_ok(torch.device(DEVICE)), reason="no rowwise _scaled_mm here")
def test_fused_w8a8_path_matches_unfused(monkeypatch):
    """W8A8 with the kernels (the interpreter on CPU): fused LayerNorm / GELU quantisation against the unfused
    module + fp8_quantize kernel, under autocast as deploy runs it, in bf16 on the GPU."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    plain = _w8a8(deployed(Net()).to(DEVICE, dtype))  # deployed on the CPU: before the backend is forced
    fused = copy.deepcopy(plain)
    monkeypatch.setenv("LITE3R_BACKEND", "triton")
    assert lite3r.fuse_fp8_inputs(fused) == 6
    x = torch.randn(2, 37, 32, device=DEVICE, dtype=dtype)
    calls = []
    real = kernels.layer_norm_fp8
    monkeypatch.setattr(kernels, "layer_norm_fp8", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        want, got = plain(x), fused(x)
    assert len(calls) == 4  # the fused kernel ran: 2 LayerNorms per block
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < (1e-5 if DEVICE == "cpu" else 1e-2), err  # a code one e4m3 step off here and there at most


# ------------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("M,C,op", [(43968, 1024, "layer_norm"), (43968, 4096, "gelu"), (1374, 2048, "layer_norm")])
def test_gpu_real_shapes(M, C, op):
    """VGGT-1B at 32 views: 44k tokens of 1024 (qkv / fc1 inputs) and 4096 (fc2 input), bf16 under autocast."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, C, device="cuda", generator=gen).to(torch.bfloat16) * 3
    if op == "gelu":
        x[:, 0] = x[:, 0].abs() + 0.1
        assert_close_quant(kernels.gelu_fp8(x), gelu_fp8_reference(x), torch.bfloat16, 1e-3)
    else:
        w = torch.randn(C, device="cuda", generator=gen).to(torch.bfloat16)
        b = torch.randn(C, device="cuda", generator=gen).to(torch.bfloat16)
        got = kernels.layer_norm_fp8(x, w, b, eps=1e-6, ln_dtype=torch.float32)
        # torch's CUDA LayerNorm: Welford moments and an approximate rsqrt (2 ulp) against two passes and sqrt_rn
        assert_close_quant(got, layer_norm_fp8_reference(x, w, b, eps=1e-6, ln_dtype=torch.float32),
                           torch.float32, 1e-3, cond=conditioning(x), ulps=8)


@pytest.mark.gpu
def test_gpu_compiled_fused_block_matches_eager():
    """The fused ops trace into torch.compile (fullgraph: no graph break) and compiled gives what eager gives, as
    closely as the unfused FP8 net does compiled vs eager (Inductor rounds its fused bf16 chains once, eager at every
    op, and FP8 codes on a rounding boundary flip either way)."""
    torch.manual_seed(0)
    plain = deployed(Net(64, 4)).to("cuda", torch.bfloat16)
    fused = copy.deepcopy(plain)
    assert lite3r.fuse_fp8_inputs(fused) == 6
    x = torch.randn(4, 300, 64, device="cuda", dtype=torch.bfloat16)
    errs = []
    for net in (plain, fused):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            eager = net(x)
            compiled = torch.compile(net, fullgraph=True, dynamic=False)(x)
        errs.append(float((compiled.float() - eager.float()).norm() / eager.float().norm()))
        torch._dynamo.reset()
    assert errs[1] < max(2 * errs[0], 2e-3), errs
