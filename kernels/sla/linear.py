"""SLA linear state: kv = phi(k)^T v [D, D] and ksum = sum_n phi(k_n) [D], fp32, in one pass over k and v (op
`lite3r::sla_linear_state`, backward `lite3r::sla_linear_state_bwd` per token tile), the input of the linear branch
phi(q) kv / (phi(q) . ksum + eps) that the fused attention kernel computes. `linear_state_torch` is its pure-torch
twin (tests/test_kernels.py compares the two); lite3r.sla_reference is the reference of the whole branch.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .common import _dot, _fm_code, _full_fp32, _phi, _phi_bwd, _tile


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _linear_state_kernel(K, V, KV, KS, N, H, D, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                         CHUNK: tl.constexpr, TILE_N: tl.constexpr, TILE_D: tl.constexpr, FM: tl.constexpr,
                         F32: tl.constexpr):
    """Grid (ceil(N / CHUNK), B*H): adds phi(k)^T v and sum phi(k) over CHUNK tokens into KV [D, D] / KS [D]
    (fp32, zero-initialised; atomics across chunks)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_d = tl.arange(0, TILE_D)
    m_d = o_d < D
    b_kv = tl.zeros([TILE_D, TILE_D], dtype=tl.float32)
    b_ks = tl.zeros([TILE_D], dtype=tl.float32)
    for n0 in range(i_c * CHUNK, tl.minimum(i_c * CHUNK + CHUNK, N), TILE_N):
        o_n = n0 + tl.arange(0, TILE_N)
        m_n = o_n < N
        m_nd = m_n[:, None] & m_d[None, :]
        b_k = tl.load(K + i_b * sk_b + i_h * sk_h + o_n[:, None].to(tl.int64) * sk_n + o_d[None, :], mask=m_nd,
                      other=0.0).to(tl.float32)
        b_v = tl.load(V + i_b * sv_b + i_h * sv_h + o_n[:, None].to(tl.int64) * sv_n + o_d[None, :], mask=m_nd,
                      other=0.0)
        b_f = tl.where(m_n[:, None], _phi(b_k, m_d, FM), 0.0)  # [TN, TD] fp32
        b_kv += _dot(tl.trans(b_f.to(b_v.dtype)), b_v, F32)  # in the input dtype (faster than tf32)
        b_ks += tl.sum(b_f, axis=0)
    o_dd = o_d[:, None] * D + o_d[None, :]
    tl.atomic_add(KV + i_bh.to(tl.int64) * D * D + o_dd, b_kv, mask=m_d[:, None] & m_d[None, :])
    tl.atomic_add(KS + i_bh.to(tl.int64) * D + o_d, b_ks, mask=m_d)


@triton.jit
def _linear_state_bwd_kernel(K, V, DKV, DKS, DK, DV, N, H, D, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                             TILE_N: tl.constexpr, TILE_D: tl.constexpr, FM: tl.constexpr, F32: tl.constexpr):
    """Grid (ceil(N / TILE_N), B*H): backward of _linear_state_kernel for TILE_N tokens: dv = phi(k) d kv,
    d phi(k) = v d kv^T + d ksum, then through phi. DKV [B*H, D, D] / DKS [B*H, D] fp32 contiguous; DK/DV
    contiguous [B, H, N, D]."""
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_n = i_t * TILE_N + tl.arange(0, TILE_N)
    o_d = tl.arange(0, TILE_D)
    m_d = o_d < D
    m_nd = (o_n < N)[:, None] & m_d[None, :]
    b_dkv = tl.load(DKV + i_bh.to(tl.int64) * D * D + o_d[:, None] * D + o_d[None, :],
                    mask=m_d[:, None] & m_d[None, :], other=0.0)  # [TD, TD]
    b_dks = tl.load(DKS + i_bh.to(tl.int64) * D + o_d, mask=m_d, other=0.0)
    b_x = tl.load(K + i_b * sk_b + i_h * sk_h + o_n[:, None].to(tl.int64) * sk_n + o_d[None, :], mask=m_nd,
                  other=0.0).to(tl.float32)  # [TN, TD]
    b_v = tl.load(V + i_b * sv_b + i_h * sv_h + o_n[:, None].to(tl.int64) * sv_n + o_d[None, :], mask=m_nd,
                  other=0.0).to(tl.float32)
    b_f = _phi(b_x, m_d, FM)
    b_df = _dot(b_v, tl.trans(b_dkv), F32) + b_dks[None, :]  # d phi(k)
    o_out = (i_bh.to(tl.int64) * N + o_n[:, None]) * D + o_d[None, :]
    tl.store(DK + o_out, _phi_bwd(b_x, b_f, b_df, FM).to(DK.dtype.element_ty), mask=m_nd)
    tl.store(DV + o_out, _dot(b_f, b_dkv, F32).to(DV.dtype.element_ty), mask=m_nd)


# ------------------------------------------------------------------------------------------------ host side
_LINEAR_STATE_CHUNK = 2048  # tokens per linear-state program (long chunks: fewer atomic adds on kv)
_LINEAR_TILE = 64  # tokens per step inside a chunk (divides this chunk and attention._LINEAR_CHUNK)


@triton_op("lite3r::sla_linear_state", mutates_args={})
def _linear_state_op(k: Tensor, v: Tensor, feature_map: int) -> tuple[Tensor, Tensor]:
    B, H, N, D = k.shape
    kv = torch.zeros((B, H, D, D), device=k.device, dtype=torch.float32)
    ksum = torch.zeros((B, H, D), device=k.device, dtype=torch.float32)
    wrap_triton(_linear_state_kernel)[(triton.cdiv(N, _LINEAR_STATE_CHUNK), B * H)](
        k, v, kv, ksum, N, H, D, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        CHUNK=_LINEAR_STATE_CHUNK, TILE_N=_LINEAR_TILE, TILE_D=_tile(D), FM=feature_map, F32=_full_fp32(k),
        num_warps=4, num_stages=2)
    return kv, ksum


def _linear_state_setup(ctx, inputs, output) -> None:
    k, v, feature_map = inputs
    ctx.save_for_backward(k, v)
    ctx.feature_map = feature_map


@triton_op("lite3r::sla_linear_state_bwd", mutates_args={})
def _linear_state_bwd_op(k: Tensor, v: Tensor, dkv: Tensor, dks: Tensor, feature_map: int) -> tuple[Tensor, Tensor]:
    """-> (dk, dv) [B, H, N, D] in k.dtype / v.dtype from d kv [B, H, D, D] and d ksum [B, H, D]."""
    B, H, N, D = k.shape
    dk = torch.empty((B, H, N, D), device=k.device, dtype=k.dtype)
    dv = torch.empty((B, H, N, D), device=v.device, dtype=v.dtype)
    wrap_triton(_linear_state_bwd_kernel)[(triton.cdiv(N, _LINEAR_TILE), B * H)](
        k, v, dkv.float().contiguous(), dks.float().contiguous(), dk, dv, N, H, D,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        TILE_N=_LINEAR_TILE, TILE_D=_tile(D), FM=feature_map, F32=_full_fp32(k), num_warps=4)
    return dk, dv


def _linear_state_backward(ctx, dkv: Tensor, dks: Tensor):
    k, v = ctx.saved_tensors
    dk, dv = torch.ops.lite3r.sla_linear_state_bwd(k, v, dkv, dks, ctx.feature_map)
    return dk, dv, None


_linear_state_op.register_autograd(_linear_state_backward, setup_context=_linear_state_setup)


def linear_state(k: Tensor, v: Tensor, feature_map: str) -> tuple[Tensor, Tensor]:
    """(kv = phi(k)^T v [B, H, D, D], ksum = sum_n phi(k_n) [B, H, D]) in fp32, one fused pass over k and v;
    differentiable in k and v."""
    return torch.ops.lite3r.sla_linear_state(k, v, _fm_code(feature_map))


def _phi_torch(x: Tensor, feature_map: str) -> Tensor:
    if feature_map == "softmax":
        return x.softmax(dim=-1)
    if feature_map == "elu":
        return torch.nn.functional.elu(x) + 1.0
    return torch.relu(x)


def linear_state_torch(k: Tensor, v: Tensor, feature_map: str) -> tuple[Tensor, Tensor]:
    """Pure-torch twin of linear_state."""
    fk = _phi_torch(k.float(), feature_map)  # [B, H, N, D]
    return fk.transpose(-1, -2) @ v.float(), fk.sum(dim=2)
