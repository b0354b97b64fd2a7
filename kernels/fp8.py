"""FP8 (E4M3) quantisation: fused amax + scale + cast per row of a [R, C] view, one Triton program per row.

    fp8_quantize(x, *, axis)   -> (x_fp8 float8_e4m3fn, scale fp32 with `axis` kept as size 1)
    fp8_fake_quant(x, *, axis) -> dequant(quant(x)) in x.dtype, straight-through gradient

Bit for bit the definition of lite3r.fp8_quantize as torch evaluates it on the same device: scale =
max(amax |x| in fp32, 1e-12) / 448 (torch on CUDA turns a division by a Python scalar into a multiply by the fp32
reciprocal, on CPU it divides; the kernel does the same per device) and
x_fp8 = (x.float() / scale).clamp(-448, 448).to(e4m3), with the correctly rounded fp32 division (`_div_scale`: a
reciprocal per row and an FMA correction per element, exact where it matters; Triton's plain `/` on fp32 may be
approximate on the GPU) and round-to-nearest-even casts. A NaN counts as an infinite amax so the row's scale is inf
and the caller's finiteness check catches it (Triton's max may skip NaNs).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import interpreting

FP8_MAX = 448.0
_MAX_TILE = 8192  # columns held in registers at once; longer rows take the two-pass loop


@triton.jit
def _to_e4m3(b_y, EMULATE: tl.constexpr):
    """fp32 in [-448, 448] -> float8_e4m3fn, round to nearest even. EMULATE rounds with fp32 bit arithmetic first
    (exact, so the cast is then exact): Triton's CPU interpreter rounds fp8 casts wrongly (ties, exponent carry)."""
    if EMULATE:
        b_sign = b_y.to(tl.int32, bitcast=True)
        b_bits = (b_sign + 0x7FFFF + ((b_sign >> 20) & 1)) & -0x100000  # keep 3 mantissa bits, ties to even
        b_norm = b_bits.to(tl.float32, bitcast=True)
        b_sub = (tl.abs(b_y) + 24576.0) - 24576.0  # 1.5 * 2**14 has fp32 ulp 2**-9, the subnormal spacing; RNE
        b_sub = tl.where(b_sign < 0, -b_sub, b_sub)  # the sign bit: keeps -0.0 like the hardware cast
        b_y = tl.where(tl.abs(b_y) < 0.015625, b_sub, b_norm)
    return b_y.to(tl.float8e4nv)


@triton.jit
def _div_scale(b_x, scale):
    """b_x / scale (fp32, scale > 0 broadcastable to b_x: a scalar, or [ROWS, 1]) for the e4m3 cast, as
    tl.math.div_rn would round it: one correctly rounded reciprocal per row and two FMAs per element instead of a
    division per element (kernels/fp8_fused.py uses it too).

    Why it is exact (Markstein 1990; Muller et al., Handbook of Floating-Point Arithmetic, "Markstein's theorem"):
    with inv = RN(1/s) and q0 = RN(x * inv), the remainder r = x - q0 * s is exact in an FMA whenever q0 is a
    faithful quotient (one of the two floats around x/s), and then q0 + r * inv = x/s + (x/s - q0) * (s * inv - 1)
    lies nearer x/s than the distance from x/s to any rounding midpoint of the fp32 grid, so fma(r, inv, q0) is
    RN(x/s) bit for bit. q0 is faithful whenever x's significand is at least s's; below that it can sit 1.5 ulp off,
    and the same bound (|x - m * s|, m a midpoint, is a nonzero multiple of 2^-48 on significands in [1, 2)) still
    holds except for both significands within 6 ulp of 2, and at the binade edges of the quotient: those pairs were
    checked exhaustively against RN(x/s) (all s for x near 1, 2 and s, all x for s near 2: no difference), and so
    were all x for some 200 other s. It needs every operand and r normal, which holds for |q0| >= 2^-11 since
    s >= 1e-12/448.
    The small and zero case: where |q0| < 2^-11, q0 itself is kept. It has x's sign bit, -0.0 included, as RN(x/s)
    has, and both lie below 2^-10, half the smallest e4m3 subnormal, so both cast to the same +-0 code. The FMAs
    would get that wrong: for x = -0.0 (GELU of x << 0 is -0.0) -q0 * s + x is +0 + -0 = +0.0, which casts to the
    code of +0, and in that range r can underflow, where the argument above no longer holds."""
    inv = tl.math.div_rn(1.0, scale)  # per row: scale is a scalar or [ROWS, 1]
    b_s = tl.broadcast_to(scale, b_x.shape)
    b_inv = tl.broadcast_to(inv, b_x.shape)
    b_q = b_x * b_inv
    b_fix = tl.fma(tl.fma(-b_q, b_s, b_x), b_inv, b_q)
    return tl.where(tl.abs(b_q) < 0.00048828125, b_q, b_fix)  # 2^-11


@triton.jit
def _dequant(b_q, scale, OUT_TY: tl.constexpr, EMULATE: tl.constexpr):
    """fp8 * scale in fp32, cast to the output dtype (round to nearest even; EMULATE rounds bf16 by bit arithmetic
    first, since the interpreter truncates fp32 -> bf16)."""
    b_y = b_q.to(tl.float32) * scale
    if EMULATE and OUT_TY == tl.bfloat16:
        b_bits = b_y.to(tl.int32, bitcast=True)
        b_y = ((b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
    return b_y.to(OUT_TY)


@triton.jit
def _fp8_rows_kernel(X, Y, S, C, stride_x, stride_y,
                     BLOCK_C: tl.constexpr, ONE_PASS: tl.constexpr, DEQUANT: tl.constexpr, EMULATE: tl.constexpr,
                     RECIPROCAL: tl.constexpr, EVEN: tl.constexpr):
    """One row a program. ONE_PASS: the row fits one tile of BLOCK_C; EVEN: and C == BLOCK_C, no column masks."""
    i_r = tl.program_id(0).to(tl.int64)
    p_x = X + i_r * stride_x
    p_y = Y + i_r * stride_y
    o_c = tl.arange(0, BLOCK_C)
    if ONE_PASS:
        m_c = o_c < C
        if EVEN:
            b_x = tl.load(p_x + o_c).to(tl.float32)  # [BC]
        else:
            b_x = tl.load(p_x + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_a = tl.where(b_x != b_x, float("inf"), tl.abs(b_x))  # NaN -> inf
        amax = tl.max(b_a, axis=0)
    else:
        b_amax = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            m_c = (c0 + o_c) < C
            b_x = tl.load(p_x + c0 + o_c, mask=m_c, other=0.0).to(tl.float32)
            b_amax = tl.maximum(b_amax, tl.where(b_x != b_x, float("inf"), tl.abs(b_x)))
        amax = tl.max(b_amax, axis=0)
    if RECIPROCAL:  # torch on CUDA divides by a Python scalar as a multiply by its fp32 reciprocal
        scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0)
    else:  # torch on CPU: a true division
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    tl.store(S + i_r, scale)
    if ONE_PASS:
        b_q = _to_e4m3(tl.clamp(_div_scale(b_x, scale), -448.0, 448.0), EMULATE)
        if DEQUANT:
            b_q = _dequant(b_q, scale, Y.dtype.element_ty, EMULATE)
        if EVEN:
            tl.store(p_y + o_c, b_q)
        else:
            tl.store(p_y + o_c, b_q, mask=m_c)
    else:
        for c0 in range(0, C, BLOCK_C):
            m_c = (c0 + o_c) < C
            b_x = tl.load(p_x + c0 + o_c, mask=m_c, other=0.0).to(tl.float32)
            b_q = _to_e4m3(tl.clamp(_div_scale(b_x, scale), -448.0, 448.0), EMULATE)
            if DEQUANT:
                tl.store(p_y + c0 + o_c, _dequant(b_q, scale, Y.dtype.element_ty, EMULATE), mask=m_c)
            else:
                tl.store(p_y + c0 + o_c, b_q, mask=m_c)


def _launch(x: Tensor, y: Tensor, scale: Tensor, dequant: bool) -> None:
    R, C = x.shape
    if R == 0 or C == 0:
        return
    block = min(triton.next_power_of_2(C), _MAX_TILE)
    # H200, 43968 rows: 1024 columns 3.5 TB/s at 2 warps (2.9 at 4), 4096 columns 3.6 at 4 (3.5 at 8). Quantise at
    # 1024 columns then 1 warp (benchmarks/gpu/fp8_rows_sweep.py, H200, torch 2.11, triton 3.6, bf16 [43968, 1024]:
    # 1 warp with _div_scale and no masks 0.0397 ms against 0.0436 ms for 2 warps, div_rn and masks; the sweep tries
    # those switches only at the old config and at the fastest of its warps x rows grid, run with div_rn and masks,
    # so 1 warp led there too). Fake-quant (DEQUANT, not swept) keeps 2 warps there.
    if block <= 1024:
        warps = 2 if dequant and block > 512 else 1
    else:
        warps = 4 if block <= 4096 else 8
    wrap_triton(_fp8_rows_kernel)[(R,)](x, y, scale, C, x.stride(0), y.stride(0), BLOCK_C=block,
                                       ONE_PASS=block >= C, DEQUANT=dequant,
                                       EMULATE=interpreting(), RECIPROCAL=x.is_cuda, EVEN=block == C,
                                       num_warps=warps)


@triton_op("lite3r::fp8_quantize_rows", mutates_args={})
def _fp8_quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [R, C] (row-contiguous) -> (x_fp8 [R, C] float8_e4m3fn, scale [R] fp32)."""
    y = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty(x.shape[:1], device=x.device, dtype=torch.float32)
    _launch(x, y, scale, dequant=False)
    return y, scale


@triton_op("lite3r::fp8_fake_quant_rows", mutates_args={})
def _fp8_fake_quant_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [R, C] (row-contiguous) -> (dequant(quant(x)) [R, C] in x.dtype, scale [R] fp32)."""
    y = torch.empty_like(x)
    scale = torch.empty(x.shape[:1], device=x.device, dtype=torch.float32)
    _launch(x, y, scale, dequant=True)
    return y, scale


def _fake_quant_setup(ctx, inputs, output) -> None:
    pass


def _fake_quant_backward(ctx, grad_y: Tensor, grad_scale) -> Tensor:
    return grad_y  # straight-through estimator


_fp8_fake_quant_rows.register_autograd(_fake_quant_backward, setup_context=_fake_quant_setup)


def _rows(x: Tensor, axis: int) -> tuple[Tensor, tuple[int, ...]]:
    """x with `axis` moved last, flattened to [R, C] (contiguous rows); and the moved shape to undo it."""
    if x.dim() == 0:
        raise ValueError("fp8 quantisation needs a tensor with at least one dimension, got a scalar")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a tensor of shape {tuple(x.shape)}")
    moved = x.movedim(axis, -1)
    return moved.reshape(-1, moved.shape[-1]).contiguous(), tuple(moved.shape)


def _check_finite(x: Tensor, scale: Tensor) -> None:
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(scale).all()):
        raise ValueError(f"fp8 quantisation of a tensor with inf/NaN values (shape {tuple(x.shape)}, {x.dtype}): "
                         "FP8 scales would be meaningless")


def fp8_quantize(x: Tensor, *, axis: int) -> tuple[Tensor, Tensor]:
    """(x_fp8 float8_e4m3fn shaped like x, scale fp32 shaped like x with `axis` of size 1); x any float dtype."""
    rows, moved = _rows(x, axis)
    y, scale = torch.ops.lite3r.fp8_quantize_rows(rows)
    _check_finite(x, scale)
    scale_shape = moved[:-1] + (1,)
    return (y.view(moved).movedim(-1, axis), scale.view(scale_shape).movedim(-1, axis))


def fp8_fake_quant(x: Tensor, *, axis: int) -> Tensor:
    """dequant(quant(x)) in x.dtype, per slice along `axis`; d out / d x = identity (STE)."""
    rows, moved = _rows(x, axis)
    y, scale = torch.ops.lite3r.fp8_fake_quant_rows(rows)
    _check_finite(x, scale)
    return y.view(moved).movedim(-1, axis)


def fp8_quantize_torch(x: Tensor, *, axis: int) -> tuple[Tensor, Tensor]:
    """Pure-torch twin (the definition), used by benchmarks as the baseline."""
    xf = x.float()
    scale = xf.abs().amax(dim=axis, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale
