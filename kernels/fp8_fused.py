"""Per-token FP8 quantisation fused into the op before a linear: LayerNorm or GELU, one Triton program per row (or
per ROWS rows, a [ROWS, BLOCK_C] block, where that measured faster).

    layer_norm_fp8(x [M, C], weight [C] | None, bias [C] | None, *, eps, ln_dtype) -> (x_fp8 [M, C], scale [M, 1])
    gelu_fp8(x [M, C]) -> (x_fp8 [M, C], scale [M, 1])         x_fp8 float8_e4m3fn, scale fp32

Each is lite3r.fp8_quantize(op(x), axis=-1) with op as torch computes it before an FP8Linear: LayerNorm in fp32 from
x (weights upcast) and rounded to `ln_dtype` (fp32 under autocast, else x's dtype), exact-erf GELU in fp32 rounded
to x's dtype. The op's output never goes to memory: one read of x, one write of fp8 bytes and a scale per row (the
unfused path writes the op's output, fp32 for LayerNorm under autocast, and reads it back to quantise it).
The scale and cast are fp8.py's, bit for bit on the op's output; the op itself agrees with torch's to an ulp or so
(another reduction order for the LayerNorm moments), so a code can land one e4m3 step away where the op's value
sits on a rounding boundary. The `*_reference` twins beside the ops are the definitions the tests compare with.
"""
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from . import interpreting
from .fp8 import FP8_MAX, _check_finite, _div_scale, _to_e4m3, fp8_quantize_torch

_MAX_C = 16384  # columns held in registers by one program; longer rows take the reference (no model here has them)
_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_OP_LAYER_NORM, _OP_GELU = 0, 1


@triton.jit
def _round_to(b_y, ROUND: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 -> the op's output dtype (ROUND 1 bf16, 2 fp16; 0 keeps fp32) and back, round to nearest even.
    EMULATE rounds bf16 with bit arithmetic: the CPU interpreter truncates fp32 -> bf16."""
    if ROUND == 1:
        if EMULATE:
            b_bits = b_y.to(tl.int32, bitcast=True)
            b_y = ((b_bits + 0x7FFF + ((b_bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
        else:
            b_y = b_y.to(tl.bfloat16).to(tl.float32)
    elif ROUND == 2:
        b_y = b_y.to(tl.float16).to(tl.float32)
    return b_y


@triton.jit
def _op_fp8_rows_kernel(X, W, B, Y, S, R, C, stride_x, stride_y, eps,
                        BLOCK_C: tl.constexpr, ROWS: tl.constexpr, OP: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, ROUND: tl.constexpr, EMULATE: tl.constexpr, RECIPROCAL: tl.constexpr,
                        EVEN: tl.constexpr, MASK_R: tl.constexpr):
    """ROWS rows a program, one [ROWS, BLOCK_C] block. EVEN: C == BLOCK_C, no column masks. MASK_R: R % ROWS != 0,
    rows past R are masked (the last program's)."""
    o_r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    o_c = tl.arange(0, BLOCK_C)
    m_c = o_c < C  # [BC]
    m_r = o_r < R  # [ROWS]
    if EVEN:
        m = m_r[:, None]  # used only with MASK_R
    elif MASK_R:
        m = m_r[:, None] & m_c[None, :]
    else:
        m = m_c[None, :]
    p_x = X + o_r[:, None] * stride_x + o_c[None, :]
    if EVEN and not MASK_R:
        b_x = tl.load(p_x).to(tl.float32)  # [ROWS, BC]
    else:
        b_x = tl.load(p_x, mask=m, other=0.0).to(tl.float32)
    if OP == 0:  # LayerNorm over each row, moments in fp32 (two passes over registers)
        if EVEN:
            n = tl.full([], BLOCK_C, tl.float32)
        else:
            n = tl.sum(m_c.to(tl.float32), axis=0)  # C as fp32 (C itself may arrive as a constexpr 1)
        mean = tl.math.div_rn(tl.sum(b_x, axis=1), n)  # [ROWS]
        b_d = b_x - mean[:, None]
        if not EVEN:
            b_d = tl.where(m_c[None, :], b_d, 0.0)
        var = tl.math.div_rn(tl.sum(b_d * b_d, axis=1), n)
        # eps is fp32 here but Inductor hands a Python float to a user kernel as fp64: div_rn takes fp32 only
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn((var + eps).to(tl.float32)))
        b_y = b_d * rstd[:, None]
        if HAS_W:
            if EVEN:
                b_w = tl.load(W + o_c)
            else:
                b_w = tl.load(W + o_c, mask=m_c, other=0.0)
            b_y = b_y * b_w.to(tl.float32)[None, :]
        if HAS_B:
            if EVEN:
                b_b = tl.load(B + o_c)
            else:
                b_b = tl.load(B + o_c, mask=m_c, other=0.0)
            b_y = b_y + b_b.to(tl.float32)[None, :]
    else:  # GELU, exact erf form
        b_y = 0.5 * b_x * (1.0 + tl.math.erf(b_x * 0.7071067811865476))
    b_y = _round_to(b_y, ROUND, EMULATE)
    if not EVEN:
        b_y = tl.where(m_c[None, :], b_y, 0.0)
    amax = tl.max(tl.where(b_y != b_y, float("inf"), tl.abs(b_y)), axis=1)  # [ROWS]; NaN -> inf, as fp8.py
    if RECIPROCAL:  # torch on CUDA divides by a Python scalar as a multiply by its fp32 reciprocal
        scale = tl.maximum(amax, 1e-12) * (1.0 / 448.0)
    else:
        scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)
    if MASK_R:
        tl.store(S + o_r, scale, mask=m_r)
    else:
        tl.store(S + o_r, scale)
    b_q = _to_e4m3(tl.clamp(_div_scale(b_y, scale[:, None]), -448.0, 448.0), EMULATE)
    p_y = Y + o_r[:, None] * stride_y + o_c[None, :]
    if EVEN and not MASK_R:
        tl.store(p_y, b_q)
    else:
        tl.store(p_y, b_q, mask=m)


def _config(op: int, block: int) -> tuple[int, int]:
    """(num_warps, rows a program) for rows of `block` (next power of two of C) columns."""
    # fp8.py's warp table as it was before its 1-warp quantise at 1024 columns (H200, 44k rows)
    warps = 1 if block <= 512 else 2 if block <= 1024 else 4 if block <= 4096 else 8
    # benchmarks/gpu/fp8_rows_sweep.py on the H200 (torch 2.11, triton 3.6; [43968, C] bf16, both with _div_scale
    # and no masks, 0 fp8 codes or scales different from the kernel before): LayerNorm at 1024 columns 2 warps and
    # 2 rows a program 0.0572 ms against 0.0757 ms for 1 row (div_rn, masks; 2 x 2 was also the fastest of the
    # sweep's warps x rows grid with div_rn and masks). GELU at 4096 stays 1 row, 4 warps (0.3174 ms against
    # 0.3818). Other shapes were not swept: 1 row, as before.
    rows = 2 if op == _OP_LAYER_NORM and block == 1024 else 1
    return warps, rows


def _launch(op: int, x: Tensor, weight, bias, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    R, C = x.shape
    y = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
    scale = torch.empty((R, 1), device=x.device, dtype=torch.float32)
    if R == 0 or C == 0:
        return y, scale
    block = triton.next_power_of_2(C)
    warps, rows = _config(op, block)
    wrap_triton(_op_fp8_rows_kernel)[(triton.cdiv(R, rows),)](
        x, x if weight is None else weight, x if bias is None else bias, y, scale, R, C, x.stride(0), y.stride(0),
        float(eps), BLOCK_C=block, ROWS=rows, OP=op, HAS_W=weight is not None, HAS_B=bias is not None,
        ROUND=_ROUND[out_dtype], EMULATE=interpreting(), RECIPROCAL=x.is_cuda, EVEN=block == C,
        MASK_R=rows > 1 and R % rows != 0, num_warps=warps)
    return y, scale


@triton_op("lite3r::layer_norm_fp8_rows", mutates_args={})
def _layer_norm_fp8_rows(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                         ln_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x [R, C] (row-contiguous) -> (quantised LayerNorm(x) [R, C] float8_e4m3fn, scale [R, 1] fp32)."""
    if x.shape[1] > _MAX_C:
        return layer_norm_fp8_reference(x, weight, bias, eps=eps, ln_dtype=ln_dtype)
    return _launch(_OP_LAYER_NORM, x, weight, bias, eps, ln_dtype)


@triton_op("lite3r::gelu_fp8_rows", mutates_args={})
def _gelu_fp8_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [R, C] (row-contiguous) -> (quantised GELU(x) [R, C] float8_e4m3fn, scale [R, 1] fp32)."""
    if x.shape[1] > _MAX_C:
        return gelu_fp8_reference(x)
    return _launch(_OP_GELU, x, None, None, 0.0, x.dtype)


def _rows(x: Tensor) -> Tensor:
    if x.dim() < 1 or x.dtype not in _ROUND:
        raise ValueError(f"fused fp8 quantisation takes a float32/bfloat16/float16 tensor [..., C], got "
                         f"{x.dtype} of shape {tuple(x.shape)}")
    return x.reshape(-1, x.shape[-1]).contiguous()


def layer_norm_fp8(x: Tensor, weight: Tensor | None, bias: Tensor | None, *, eps: float,
                   ln_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """fp8_quantize(layer_norm(x) rounded to ln_dtype (default x.dtype), axis=-1), flattened to rows:
    ([M, C] float8_e4m3fn, [M, 1] fp32) with M = x.numel() // C."""
    if ln_dtype not in (None, *_ROUND):
        raise ValueError(f"ln_dtype must be float32, bfloat16 or float16, got {ln_dtype}")
    rows = _rows(x)
    y, scale = torch.ops.lite3r.layer_norm_fp8_rows(rows, weight, bias, float(eps), ln_dtype or x.dtype)
    _check_finite(x, scale)
    return y, scale


def gelu_fp8(x: Tensor) -> tuple[Tensor, Tensor]:
    """fp8_quantize(gelu(x) in x.dtype, axis=-1), flattened to rows: ([M, C] float8_e4m3fn, [M, 1] fp32)."""
    y, scale = torch.ops.lite3r.gelu_fp8_rows(_rows(x))
    _check_finite(x, scale)
    return y, scale


# ------------------------------------------------------------------------------------- pure-torch definitions
def layer_norm_fp8_reference(x: Tensor, weight: Tensor | None, bias: Tensor | None, *, eps: float,
                             ln_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """What the unfused path computes: F.layer_norm in ln_dtype (autocast's fp32 LayerNorm when fp32), then
    fp8_quantize per row."""
    dt = ln_dtype or x.dtype
    w = None if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    y = F.layer_norm(x.reshape(-1, x.shape[-1]).to(dt), x.shape[-1:], w, b, eps)
    return fp8_quantize_torch(y, axis=-1)


def gelu_fp8_reference(x: Tensor) -> tuple[Tensor, Tensor]:
    """F.gelu (exact erf) in x.dtype, then fp8_quantize per row."""
    return fp8_quantize_torch(F.gelu(x.reshape(-1, x.shape[-1])), axis=-1)


__all__ = ["layer_norm_fp8", "gelu_fp8", "layer_norm_fp8_reference", "gelu_fp8_reference", "FP8_MAX"]
