"""What the SLA ops share: the feature maps phi (and their backward) and the MMA helper every kernel calls, tile
sizes, the fp32 / tf32 choice and the input checks of the public functions.

Tiles: a block of `block_q` (`block_k`) tokens is held in a power-of-two tile >= 16 rows, D in a power-of-two tile
>= 16 columns; masks handle partial blocks, the partial last block and D not a power of two.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import interpreting

LINEAR_EPS = 1e-6  # same as lite3r.LINEAR_EPS
FEATURE_MAPS = ("softmax", "elu", "relu")  # kernel code 0, 1, 2
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E); a constexpr so kernels can read it


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot(a, b, F32: tl.constexpr):
    """tl.dot; F32: fp32 operands in full fp32 (no tf32): for fp32 inputs, and on the CPU interpreter, which
    mis-multiplies bf16 tiles (the operand values are unchanged by the upcast)."""
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _phi(b_x, m_d, FM: tl.constexpr):
    """Feature map of an fp32 [rows, TD] tile over its real columns (m_d); padded columns -> 0."""
    if FM == 0:  # softmax over D; one reciprocal per row (a division per element is slower)
        b_x = tl.where(m_d[None, :], b_x, float("-inf"))
        b_e = tl.math.exp2((b_x - tl.max(b_x, axis=1)[:, None]) * LOG2E)
        b_f = b_e * (1.0 / tl.sum(b_e, axis=1))[:, None]
    elif FM == 1:  # elu + 1
        b_f = tl.where(b_x > 0, b_x + 1.0, tl.exp(tl.minimum(b_x, 0.0)))
    else:  # relu
        b_f = tl.maximum(b_x, 0.0)
    return tl.where(m_d[None, :], b_f, 0.0)


@triton.jit
def _phi_bwd(b_x, b_f, b_df, FM: tl.constexpr):
    """d x from d phi (b_df) for an fp32 [rows, TD] tile x with b_f = _phi(x) (zero on padded columns)."""
    if FM == 0:
        return b_f * (b_df - tl.sum(b_df * b_f, axis=1)[:, None])
    elif FM == 1:
        return tl.where(b_x > 0, b_df, b_df * b_f)
    else:
        return tl.where(b_x > 0, b_df, 0.0)


# ------------------------------------------------------------------------------------------------ host side
def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _full_fp32(t: Tensor) -> bool:
    """Matmuls in full fp32 (not tf32): for fp32 inputs, and always under the interpreter."""
    return interpreting() or t.dtype == torch.float32


def _fm_code(feature_map: str) -> int:
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")
    return FEATURE_MAPS.index(feature_map)


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_qkv(q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"q, k, v must share one of float32/float16/bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    if q.shape[2] == 0:
        raise ValueError("q, k, v have no tokens (N = 0)")
