"""Fused SLA attention, forward and backward (ops `lite3r::sla_fwd` with its autograd, `lite3r::sla_bwd`), and
`sla_branches`, the differentiable entry point (block map + linear state + fused kernel); `sla_output`, the
inference entry (op `lite3r::sla_fwd_sum`): proj_l folded into the linear state, the kernel's SUM epilogue writes
o_s + proj_l(o_l) into one buffer.

    o_s, o_l = sla_branches(q, k, v, topk=0.05, block_q=64, block_k=64, feature_map="softmax")
    o = sla_output(q, k, v, topk=0.05, weight=proj_l.weight, bias=proj_l.bias)      # no autograd

Shapes: B batch, H heads, N tokens, D head dim, Mq/Mk query/key blocks, K kept key blocks per query block.
Forward (`_sla_fwd_kernel`): one program per (query block, batch*head) walks the K kept key blocks of its LUT row
with an online softmax, STEP blocks gathered into one tile per update (o_s, and the row log-sum-exp for backward;
an unmasked EVEN variant when every block is full), and computes the linear branch
phi(q) (phi(k)^T v) / (phi(q) . sum phi(k) + eps) from the linear state kv, ksum (linear.py). When every block is
full the kept key/value blocks come through TMA descriptors (`USE_TMA`; eager only: torch's tracing of a triton_op
cannot capture a descriptor, so compiled graphs use pointer loads), and in eager CUDA `sla_branches` runs the linear
state on a side stream beside the block map (`OVERLAP`). Both switches live here and are read at call time.
Backward: `_sla_bwd_dq_kernel` per query block recomputes P from the LSE (dq of both branches, per-row work only);
`_sla_bwd_dstate_kernel` per chunk of tokens sums d kv and d ksum (one atomic add per chunk);
`_sla_bwd_dkdv_kernel` per key block walks the query blocks that selected it (the transposed LUT, CSR) for dk and
dv of the sparse branch, busiest key blocks launched first. Reference: lite3r.sla_reference (tests/test_kernels.py).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from .. import interpreting
from .block_map import sla_block_map
from .common import (LINEAR_EPS, LOG2E, _check_qkv, _dot, _fm_code, _full_fp32, _last_dim_contiguous, _phi,
                     _phi_bwd, _tile)
from .linear import _LINEAR_TILE, linear_state

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:
    _TensorDescriptor = None


def _fwd_configs():
    """STEP: kept key blocks per loop step of the forward kernel (one online-softmax update over a [TQ, STEP * TK]
    score tile: fewer row reductions and accumulator rescales, deeper P @ V); STEP=2 at 4 warps measured best.
    maxnreg=168 keeps 3 programs (4 warps each) on an SM's 64K registers; the uncapped configs are for the shapes
    where the cap would spill (D = 128, fp32): _prune_fwd_configs. The interpreter runs one config (tests swap
    `_sla_fwd_kernel.configs` to reach STEP=1). Measurements: docs/benchmarks.md, kernel tuning history."""
    if interpreting():
        return [triton.Config({"STEP": 2}, num_warps=4, num_stages=1)]
    return [triton.Config({"STEP": 2}, num_warps=4, num_stages=n, maxnreg=r) for n in (2, 3, 4) for r in (168, None)]


def _prune_fwd_configs(configs, named_args, **kwargs):
    """The 168-register cap for bf16/fp16 at D <= 64 (the shapes it was measured on), no cap elsewhere: a choice
    made here, not by timing, because the autotuner's short timings once took a slower uncapped config."""
    args = {**named_args, **kwargs}  # the constexprs come as keywords
    capped = args["TILE_D"] <= 64 and not args["F32"]
    kept = [c for c in configs if (c.maxnreg is not None) == capped]
    return kept or configs


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _linear_num(b_f, b_kv, F32: tl.constexpr):
    """phi(q) @ kv for an fp32 [TQ, TD] tile b_f >= 0 and fp32 kv [TD, TD]. Unless F32: fp16 operands, each row of
    b_f and all of kv scaled to at most 1 in magnitude first (kv sums over all N tokens and can pass fp16's range):
    the rounding of tf32 (10-bit mantissas), without tf32's fp32 operand registers (bf16 operands: 8x the error)."""
    if F32:
        return _dot(b_f, b_kv, F32)
    r = tl.max(b_f, axis=1)
    r = tl.where(r > 0, r, 1.0)
    c = tl.max(tl.max(tl.abs(b_kv), axis=1), axis=0)
    c = tl.where(c > 0, c, 1.0)
    b_num = tl.dot((b_f * (1.0 / r)[:, None]).to(tl.float16), (b_kv * (1.0 / c)).to(tl.float16))
    return b_num * (r * c)[:, None]


@triton.jit
def _load(p, m, EVEN: tl.constexpr):
    """tl.load of a tile; masked (zeros outside m) unless EVEN says every element is real."""
    if EVEN:
        return tl.load(p)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store(p, x, m, EVEN: tl.constexpr):
    """tl.store of a tile; masked by m unless EVEN says every element is real."""
    if EVEN:
        tl.store(p, x)
    else:
        tl.store(p, x, mask=m)


@triton.jit
def _new_max(b_m, b_mx, qk_scale):
    """(new running row max in log2 units, rescale factor of what was accumulated) from the step's raw score max."""
    b_mn = tl.maximum(b_m, b_mx * qk_scale)  # qk_scale > 0 commutes with the max
    return b_mn, tl.math.exp2(b_m - b_mn)


@triton.jit
def _accumulate(b_acc, b_l, b_s, b_v, b_mn, qk_scale, F32: tl.constexpr):
    """Adds the softmax numerators of a raw score tile b_s (one FMA + exp2 per score) times b_v to b_acc, their row
    sums to b_l."""
    b_p = tl.math.exp2(b_s * qk_scale - b_mn[:, None])
    return b_acc + _dot(b_p.to(b_v.dtype), b_v, F32), b_l + tl.sum(b_p, axis=1)


@triton.jit
def _fwd_step(b_q, b_m, b_l, b_acc, k_base, v_base, p_lut, j, sk_n, sv_n, N, D, qk_scale,
              BLOCK_K: tl.constexpr, TILE_K: tl.constexpr, TILE_D: tl.constexpr, STEP: tl.constexpr,
              EVEN: tl.constexpr, F32: tl.constexpr):
    """Online-softmax update of (row max b_m, row sum b_l, b_acc) over the key blocks of LUT slots j .. j+STEP-1,
    gathered by pointers as one [STEP * TK, TD] key (value) tile. Unless EVEN, keys past N or past BLOCK_K and D
    columns past D are masked."""
    o_c = tl.arange(0, STEP * TILE_K)
    o_r = o_c % TILE_K  # row inside its key block
    o_d = tl.arange(0, TILE_D)
    b_kb = tl.zeros([STEP * TILE_K], dtype=tl.int32) + tl.load(p_lut + j)  # [STEP * TK]: each row's key block
    for g in tl.static_range(1, STEP):
        b_kb = tl.where(o_c // TILE_K == g, tl.load(p_lut + j + g), b_kb)
    o_k = b_kb * BLOCK_K + o_r  # token index
    p_k = k_base + (o_k * sk_n)[:, None] + o_d[None, :]  # 32-bit offsets inside the head (_sla_fwd checks)
    p_v = v_base + (o_k * sv_n)[:, None] + o_d[None, :]
    m_k = (o_r < BLOCK_K) & (o_k < N)
    m_kd = m_k[:, None] & (o_d < D)[None, :]
    b_k = _load(p_k, m_kd, EVEN)  # [STEP * TK, TD]
    b_v = _load(p_v, m_kd, EVEN)
    b_s = _dot(b_q, tl.trans(b_k), F32)  # [TQ, STEP * TK] unscaled q . k
    if not EVEN:
        b_s = tl.where(m_k[None, :], b_s, float("-inf"))
    b_mn, b_alpha = _new_max(b_m, tl.max(b_s, axis=1), qk_scale)
    b_acc, b_l = _accumulate(b_acc * b_alpha[:, None], b_l * b_alpha, b_s, b_v, b_mn, qk_scale, F32)
    return b_mn, b_l, b_acc


@triton.jit
def _fwd_step_tma(b_q, b_m, b_l, b_acc, K, V, i_b, i_h, p_lut, j, qk_scale, BLOCK_K: tl.constexpr,
                  TILE_D: tl.constexpr, STEP: tl.constexpr, F32: tl.constexpr):
    """_fwd_step for full blocks (EVEN) through TMA descriptors K, V of [B, H, N, D] with [1, 1, BLOCK_K, D]
    boxes: STEP (1 or 2) kept blocks, one score tile and one P @ V each (gathering them into one tile would cost a
    round trip through shared memory), one max and one rescale per step."""
    kb = tl.load(p_lut + j) * BLOCK_K
    b_k0 = K.load([i_b, i_h, kb, 0]).reshape(BLOCK_K, TILE_D)
    b_v0 = V.load([i_b, i_h, kb, 0]).reshape(BLOCK_K, TILE_D)
    b_s0 = _dot(b_q, tl.trans(b_k0), F32)
    b_mx = tl.max(b_s0, axis=1)
    if STEP == 2:
        kb = tl.load(p_lut + j + 1) * BLOCK_K
        b_k1 = K.load([i_b, i_h, kb, 0]).reshape(BLOCK_K, TILE_D)
        b_v1 = V.load([i_b, i_h, kb, 0]).reshape(BLOCK_K, TILE_D)
        b_s1 = _dot(b_q, tl.trans(b_k1), F32)
        b_mx = tl.maximum(b_mx, tl.max(b_s1, axis=1))
    b_mn, b_alpha = _new_max(b_m, b_mx, qk_scale)
    b_acc, b_l = _accumulate(b_acc * b_alpha[:, None], b_l * b_alpha, b_s0, b_v0, b_mn, qk_scale, F32)
    if STEP == 2:
        b_acc, b_l = _accumulate(b_acc, b_l, b_s1, b_v1, b_mn, qk_scale, F32)
    return b_mn, b_l, b_acc


@triton.autotune(configs=_fwd_configs(), key=["D", "KK", "BLOCK_Q", "BLOCK_K", "FM", "LINEAR", "EVEN", "TMA", "F32"],
                 prune_configs_by={"early_config_prune": _prune_fwd_configs})
@triton.jit
def _sla_fwd_kernel(Q, K, V, LUT, KV, KS, OS, OL, LSE,
                    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    N, H, D, MQ, KK, SM_SCALE: tl.constexpr, EPS: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, TILE_Q: tl.constexpr, TILE_K: tl.constexpr,
                    TILE_D: tl.constexpr, FM: tl.constexpr, LINEAR: tl.constexpr, EVEN: tl.constexpr,
                    TMA: tl.constexpr, STEP: tl.constexpr, F32: tl.constexpr, SUM: tl.constexpr = False):
    """Grid (Mq, B*H). OS/OL: [B, H, N, D] contiguous, LSE: [B, H, N] fp32 (log2 units). EVEN: blocks are full
    tiles of real tokens (BLOCK_Q = TILE_Q and BLOCK_K = TILE_K divide N) and D = TILE_D: no masks at all. TMA
    (EVEN only): K and V are TMA descriptors of [B, H, N, D] (the sk_*/sv_* strides are unused). SUM (with
    LINEAR, inference): OS gets o_s + o_l in one rounding and OL is not written (sla_output)."""
    tl.static_assert((STEP == 1) | (STEP == 2), "STEP must be 1 or 2")
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_q = i_m * BLOCK_Q + tl.arange(0, TILE_Q)
    o_d = tl.arange(0, TILE_D)
    m_q = (tl.arange(0, TILE_Q) < BLOCK_Q) & (o_q < N)
    m_d = o_d < D
    m_qd = m_q[:, None] & m_d[None, :]
    b_q = _load(Q + i_b * sq_b + i_h * sq_h + o_q[:, None].to(tl.int64) * sq_n + o_d[None, :], m_qd, EVEN)  # [TQ,TD]
    p_lut = LUT + (i_bh.to(tl.int64) * MQ + i_m) * KK
    qk_scale = SM_SCALE * LOG2E
    b_m = tl.full([TILE_Q], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([TILE_Q], dtype=tl.float32)
    b_acc = tl.zeros([TILE_Q, TILE_D], dtype=tl.float32)
    # the KK % STEP remaining slots go one at a time after the loop (no slot masks anywhere)
    if TMA:
        for j in range(0, KK - KK % STEP, STEP):
            b_m, b_l, b_acc = _fwd_step_tma(b_q, b_m, b_l, b_acc, K, V, i_bh // H, i_bh % H, p_lut, j, qk_scale,
                                            BLOCK_K, TILE_D, STEP, F32)
        for j in range(KK - KK % STEP, KK):
            b_m, b_l, b_acc = _fwd_step_tma(b_q, b_m, b_l, b_acc, K, V, i_bh // H, i_bh % H, p_lut, j, qk_scale,
                                            BLOCK_K, TILE_D, 1, F32)
    else:
        k_base = K + i_b * sk_b + i_h * sk_h
        v_base = V + i_b * sv_b + i_h * sv_h
        for j in range(0, KK - KK % STEP, STEP):
            b_m, b_l, b_acc = _fwd_step(b_q, b_m, b_l, b_acc, k_base, v_base, p_lut, j, sk_n, sv_n, N, D,
                                        qk_scale, BLOCK_K, TILE_K, TILE_D, STEP, EVEN, F32)
        for j in range(KK - KK % STEP, KK):
            b_m, b_l, b_acc = _fwd_step(b_q, b_m, b_l, b_acc, k_base, v_base, p_lut, j, sk_n, sv_n, N, D,
                                        qk_scale, BLOCK_K, TILE_K, TILE_D, 1, EVEN, F32)
    b_os = b_acc / b_l[:, None]
    o_out = i_bh.to(tl.int64) * N * D + o_q[:, None].to(tl.int64) * D + o_d[None, :]
    if not SUM:
        _store(OS + o_out, b_os.to(OS.dtype.element_ty), m_qd, EVEN)
    _store(LSE + i_bh.to(tl.int64) * N + o_q, b_m + tl.math.log2(b_l), m_q, EVEN)
    if LINEAR:
        # q times the identity: an exact fp32 copy of q in the MMA result layout, where phi's row reductions take 2
        # shuffles (q as loaded needed far more shuffles and registers)
        b_eye = (o_d[:, None] == o_d[None, :]).to(tl.float32 if F32 else b_q.dtype)
        b_f = _phi(_dot(b_q, b_eye, F32), m_d, FM)  # [TQ, TD]
        o_dd = o_d[:, None] * D + o_d[None, :]
        b_kv = _load(KV + i_bh.to(tl.int64) * D * D + o_dd, m_d[:, None] & m_d[None, :], EVEN)  # [TD, TD]
        b_ks = _load(KS + i_bh.to(tl.int64) * D + o_d, m_d, EVEN)  # [TD]
        b_num = _linear_num(b_f, b_kv, F32)  # [TQ, TD]
        b_den = tl.sum(b_f * b_ks[None, :], axis=1) + EPS
        if SUM:
            _store(OS + o_out, (b_os + b_num / b_den[:, None]).to(OS.dtype.element_ty), m_qd, EVEN)
        else:
            _store(OL + o_out, (b_num / b_den[:, None]).to(OL.dtype.element_ty), m_qd, EVEN)


@triton.jit
def _linear_rows_bwd(b_f, b_dol, b_kv, b_ks, EPS: tl.constexpr, F32: tl.constexpr):
    """Per-row backward of o_l = num / den, num = phi(q) kv, den = phi(q) . ksum + eps, from b_f = phi(q)
    [TQ, TD] and dO_l (fp32, zero on padded rows) -> (d num [TQ, TD], d den [TQ])."""
    b_den = tl.sum(b_f * b_ks[None, :], axis=1) + EPS  # [TQ]
    b_ol = _dot(b_f, b_kv, F32) / b_den[:, None]
    return b_dol / b_den[:, None], -tl.sum(b_dol * b_ol, axis=1) / b_den


@triton.jit
def _sla_bwd_dq_kernel(Q, K, V, LUT, KV, KS, OS, DOS, DOL, LSE, DELTA, DQ,
                       sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                       N, H, D, MQ, KK,
                       SM_SCALE: tl.constexpr, EPS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                       TILE_Q: tl.constexpr, TILE_K: tl.constexpr, TILE_D: tl.constexpr, FM: tl.constexpr,
                       F32: tl.constexpr):
    """Grid (Mq, B*H): dq of both branches for one query block. OS/DOS/DOL/DQ contiguous [B, H, N, D]; writes
    DELTA = rowsum(dO_s * O_s) for the dk/dv kernel."""
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_q = i_m * BLOCK_Q + tl.arange(0, TILE_Q)
    o_d = tl.arange(0, TILE_D)
    m_q = (tl.arange(0, TILE_Q) < BLOCK_Q) & (o_q < N)
    m_d = o_d < D
    m_qd = m_q[:, None] & m_d[None, :]
    b_q = tl.load(Q + i_b * sq_b + i_h * sq_h + o_q[:, None].to(tl.int64) * sq_n + o_d[None, :],
                  mask=m_qd, other=0.0)  # [TQ, TD]
    o_row = i_bh.to(tl.int64) * N * D + o_q[:, None].to(tl.int64) * D + o_d[None, :]
    b_do = tl.load(DOS + o_row, mask=m_qd, other=0.0)  # [TQ, TD]
    b_o = tl.load(OS + o_row, mask=m_qd, other=0.0)
    b_delta = tl.sum(b_do.to(tl.float32) * b_o.to(tl.float32), axis=1)  # [TQ]
    tl.store(DELTA + i_bh.to(tl.int64) * N + o_q, b_delta, mask=m_q)
    b_lse = tl.load(LSE + i_bh.to(tl.int64) * N + o_q, mask=m_q, other=0.0)
    k_base = K + i_b * sk_b + i_h * sk_h
    v_base = V + i_b * sv_b + i_h * sv_h
    p_lut = LUT + (i_bh.to(tl.int64) * MQ + i_m) * KK
    qk_scale = SM_SCALE * LOG2E  # constexpr
    b_dq = tl.zeros([TILE_Q, TILE_D], dtype=tl.float32)
    for j in range(0, KK):
        i_kb = tl.load(p_lut + j)
        o_k = i_kb * BLOCK_K + tl.arange(0, TILE_K)
        m_k = (tl.arange(0, TILE_K) < BLOCK_K) & (o_k < N)
        m_kd = m_k[:, None] & m_d[None, :]
        b_k = tl.load(k_base + o_k[:, None].to(tl.int64) * sk_n + o_d[None, :], mask=m_kd, other=0.0)  # [TK, TD]
        b_v = tl.load(v_base + o_k[:, None].to(tl.int64) * sv_n + o_d[None, :], mask=m_kd, other=0.0)
        b_s = _dot(b_q, tl.trans(b_k), F32) * qk_scale  # [TQ, TK]
        b_p = tl.where(m_k[None, :], tl.math.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = _dot(b_do, tl.trans(b_v), F32)  # [TQ, TK]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += _dot(b_ds.to(b_k.dtype), b_k, F32)
    b_dq = b_dq * SM_SCALE
    # linear branch (its d kv, d ksum: _sla_bwd_dstate_kernel)
    b_x = b_q.to(tl.float32)
    b_f = _phi(b_x, m_d, FM)  # [TQ, TD]
    b_kv = tl.load(KV + i_bh.to(tl.int64) * D * D + o_d[:, None] * D + o_d[None, :],
                   mask=m_d[:, None] & m_d[None, :], other=0.0)  # [TD, TD]
    b_ks = tl.load(KS + i_bh.to(tl.int64) * D + o_d, mask=m_d, other=0.0)
    b_dol = tl.load(DOL + o_row, mask=m_qd, other=0.0).to(tl.float32)
    b_dnum, b_dden = _linear_rows_bwd(b_f, b_dol, b_kv, b_ks, EPS, F32)
    b_df = _dot(b_dnum, tl.trans(b_kv), F32) + b_dden[:, None] * b_ks[None, :]  # d phi(q)
    b_dq += _phi_bwd(b_x, b_f, b_df, FM)
    tl.store(DQ + o_row, b_dq.to(DQ.dtype.element_ty), mask=m_qd)


@triton.jit
def _sla_bwd_dstate_kernel(Q, KV, KS, DOL, DKV, DKS, N, H, D, sq_b, sq_h, sq_n,
                           EPS: tl.constexpr, CHUNK: tl.constexpr, TILE_N: tl.constexpr, TILE_D: tl.constexpr,
                           FM: tl.constexpr, F32: tl.constexpr):
    """Grid (ceil(N / CHUNK), B*H): adds d kv = phi(q)^T d num [D, D] and d ksum = sum d den phi(q) [D] over
    CHUNK tokens into DKV / DKS (fp32, zero-initialised): one atomic add per chunk, not per query block."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64)
    o_d = tl.arange(0, TILE_D)
    m_d = o_d < D
    o_dd = o_d[:, None] * D + o_d[None, :]
    m_dd = m_d[:, None] & m_d[None, :]
    b_kv = tl.load(KV + i_bh.to(tl.int64) * D * D + o_dd, mask=m_dd, other=0.0)  # [TD, TD]
    b_ks = tl.load(KS + i_bh.to(tl.int64) * D + o_d, mask=m_d, other=0.0)
    b_dkv = tl.zeros([TILE_D, TILE_D], dtype=tl.float32)
    b_dks = tl.zeros([TILE_D], dtype=tl.float32)
    for n0 in range(i_c * CHUNK, tl.minimum(i_c * CHUNK + CHUNK, N), TILE_N):
        o_n = n0 + tl.arange(0, TILE_N)
        m_nd = (o_n < N)[:, None] & m_d[None, :]
        b_x = tl.load(Q + i_b * sq_b + i_h * sq_h + o_n[:, None].to(tl.int64) * sq_n + o_d[None, :], mask=m_nd,
                      other=0.0).to(tl.float32)  # [TN, TD]
        b_dol = tl.load(DOL + (i_bh.to(tl.int64) * N + o_n[:, None]) * D + o_d[None, :], mask=m_nd,
                        other=0.0).to(tl.float32)  # zero on padded rows: they add nothing
        b_f = _phi(b_x, m_d, FM)
        b_dnum, b_dden = _linear_rows_bwd(b_f, b_dol, b_kv, b_ks, EPS, F32)
        b_dkv += _dot(tl.trans(b_f), b_dnum, F32)
        b_dks += tl.sum(b_dden[:, None] * b_f, axis=0)
    tl.atomic_add(DKV + i_bh.to(tl.int64) * D * D + o_dd, b_dkv, mask=m_dd)
    tl.atomic_add(DKS + i_bh.to(tl.int64) * D + o_d, b_dks, mask=m_d)


@triton.jit
def _sla_bwd_dkdv_kernel(Q, K, V, DOS, LSE, DELTA, ORDER, QOFF, QCNT, QIDX, DK, DV,
                         sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                         N, H, D, MK, SM_SCALE: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, TILE_Q: tl.constexpr, TILE_K: tl.constexpr,
                         TILE_D: tl.constexpr, F32: tl.constexpr):
    """Grid (B*H*Mk,): dk, dv of the sparse branch for one key block, over the query blocks that kept it. Program
    i takes slot ORDER[i] = bh * Mk + key block: busiest key blocks first, so the short ones fill the tail."""
    i_slot = tl.load(ORDER + tl.program_id(0)).to(tl.int64)
    i_n, i_bh = i_slot % MK, i_slot // MK
    i_b, i_h = i_bh // H, i_bh % H
    o_k = i_n * BLOCK_K + tl.arange(0, TILE_K)
    o_d = tl.arange(0, TILE_D)
    m_k = (tl.arange(0, TILE_K) < BLOCK_K) & (o_k < N)
    m_d = o_d < D
    m_kd = m_k[:, None] & m_d[None, :]
    b_k = tl.load(K + i_b * sk_b + i_h * sk_h + o_k[:, None].to(tl.int64) * sk_n + o_d[None, :], mask=m_kd,
                  other=0.0)  # [TK, TD]
    b_v = tl.load(V + i_b * sv_b + i_h * sv_h + o_k[:, None].to(tl.int64) * sv_n + o_d[None, :], mask=m_kd,
                  other=0.0)
    q_base = Q + i_b * sq_b + i_h * sq_h
    row_base = i_bh * N
    start = tl.load(QOFF + i_slot)
    count = tl.load(QCNT + i_slot)
    qk_scale = SM_SCALE * LOG2E  # constexpr
    b_dk = tl.zeros([TILE_K, TILE_D], dtype=tl.float32)
    b_dv = tl.zeros([TILE_K, TILE_D], dtype=tl.float32)
    for t in range(0, count):
        i_qb = tl.load(QIDX + start + t)
        o_q = i_qb * BLOCK_Q + tl.arange(0, TILE_Q)
        m_q = (tl.arange(0, TILE_Q) < BLOCK_Q) & (o_q < N)
        m_qd = m_q[:, None] & m_d[None, :]
        b_q = tl.load(q_base + o_q[:, None].to(tl.int64) * sq_n + o_d[None, :], mask=m_qd, other=0.0)  # [TQ,TD]
        b_do = tl.load(DOS + (row_base + o_q[:, None].to(tl.int64)) * D + o_d[None, :], mask=m_qd, other=0.0)
        b_lse = tl.load(LSE + row_base + o_q, mask=m_q, other=0.0)
        b_delta = tl.load(DELTA + row_base + o_q, mask=m_q, other=0.0)
        b_st = _dot(b_k, tl.trans(b_q), F32) * qk_scale  # [TK, TQ]
        b_pt = tl.where(m_q[None, :] & m_k[:, None], tl.math.exp2(b_st - b_lse[None, :]), 0.0)
        b_dv += _dot(b_pt.to(b_do.dtype), b_do, F32)
        b_dpt = _dot(b_v, tl.trans(b_do), F32)  # [TK, TQ]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += _dot(b_dst.to(b_q.dtype), b_q, F32)
    o_out = (row_base + o_k[:, None].to(tl.int64)) * D + o_d[None, :]
    tl.store(DK + o_out, (b_dk * SM_SCALE).to(DK.dtype.element_ty), mask=m_kd)
    tl.store(DV + o_out, b_dv.to(DV.dtype.element_ty), mask=m_kd)


# ------------------------------------------------------------------------------------------------ host side
_FWD_MAX_OFFSET = 2**31  # the forward kernel's key/value offsets inside a head are int32
# TMA loads of the kept key/value blocks when every block is full (slightly faster than pointer loads); False:
# pointer loads everywhere (tests and benchmarks flip it here, lite3r_kernels.sla.attention.USE_TMA)
USE_TMA = True


def _tma_descriptors(k: Tensor, v: Tensor, block_k: int):
    """TMA descriptors of k and v ([1, 1, block_k, D] boxes), or None where TMA does not apply: a GPU before Hopper,
    a stride or base not 16-byte aligned, no host-side descriptors in this Triton, or inside torch.compile's tracing
    (torch's tracing of a triton_op cannot capture a descriptor yet: compiled graphs take the pointer loads)."""
    if torch.compiler.is_compiling() or not USE_TMA or _TensorDescriptor is None or is_fake(k):
        return None
    if not interpreting() and torch.cuda.get_device_capability(k.device)[0] < 9:
        return None
    for t in (k, v):
        size = t.element_size()
        if (t.storage_offset() * size) % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return None
    box = [1, 1, block_k, k.shape[-1]]
    return _TensorDescriptor.from_tensor(k, box), _TensorDescriptor.from_tensor(v, box)


@triton_op("lite3r::sla_fwd", mutates_args={})
def _sla_fwd(q: Tensor, k: Tensor, v: Tensor, lut: Tensor, kv: Tensor, ksum: Tensor, block_q: int, block_k: int,
             feature_map: int) -> tuple[Tensor, Tensor, Tensor]:
    """-> (o_s, o_l, lse): o_s/o_l [B, H, N, D] in q.dtype, lse fp32 [B, H, N] in log2 units."""
    o_s = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    o_l = torch.empty_like(o_s)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    _launch_fwd(q, k, v, lut, kv, ksum, o_s, o_l, lse, block_q, block_k, feature_map, False)
    return o_s, o_l, lse


@triton_op("lite3r::sla_fwd_sum", mutates_args={})
def _sla_fwd_sum(q: Tensor, k: Tensor, v: Tensor, lut: Tensor, kv: Tensor, ksum: Tensor, block_q: int,
                 block_k: int, feature_map: int) -> Tensor:
    """-> o_s + o_l [B, H, N, D] in q.dtype, one buffer (inference: no autograd; sla_output)."""
    o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    _launch_fwd(q, k, v, lut, kv, ksum, o, o, lse, block_q, block_k, feature_map, True)
    return o


def _launch_fwd(q: Tensor, k: Tensor, v: Tensor, lut: Tensor, kv: Tensor, ksum: Tensor, o_s: Tensor, o_l: Tensor,
                lse: Tensor, block_q: int, block_k: int, feature_map: int, sum_out: bool) -> None:
    B, H, N, D = q.shape
    n_q, kept = lut.shape[2], lut.shape[3]
    if (N + block_k) * max(k.stride(2), v.stride(2)) >= _FWD_MAX_OFFSET:
        k, v = k.contiguous(), v.contiguous()
        if (N + block_k) * D >= _FWD_MAX_OFFSET:
            raise ValueError(f"N={N} tokens of D={D} overflow the forward kernel's 32-bit in-head offsets")
    even = all(b == _tile(b) and N % b == 0 for b in (block_q, block_k)) and D == _tile(D)
    descriptors = _tma_descriptors(k, v, block_k) if even else None
    k_arg, v_arg = descriptors or (k, v)
    wrap_triton(_sla_fwd_kernel)[(n_q, B * H)](
        q, k_arg, v_arg, lut, kv, ksum, o_s, o_l, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        N, H, D, n_q, kept, D ** -0.5, LINEAR_EPS,
        BLOCK_Q=block_q, BLOCK_K=block_k, TILE_Q=_tile(block_q), TILE_K=_tile(block_k), TILE_D=_tile(D),
        FM=feature_map, LINEAR=True, EVEN=even, TMA=descriptors is not None, F32=_full_fp32(q), SUM=sum_out)


def transpose_lut(lut: Tensor, n_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """CSR of the LUT by key block: (offsets [B*H*Mk], counts [B*H*Mk], query-block ids [B*H*Mq*K]), int32.
    The query blocks that kept key block j of head bh are qidx[offsets[bh*Mk+j] : ... + counts[bh*Mk+j]]."""
    B, H, n_q, kept = lut.shape
    key = (lut.reshape(B * H, n_q * kept).long()
           + torch.arange(B * H, device=lut.device)[:, None] * n_k).flatten()  # [B*H*Mq*K]
    qid = (torch.arange(n_q * kept, device=lut.device) // kept).repeat(B * H)
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(B * H * n_k, device=lut.device, dtype=torch.int64)
    counts.scatter_add_(0, key, torch.ones_like(key))
    offsets = counts.cumsum(0) - counts
    return offsets.to(torch.int32), counts.to(torch.int32), qid[order].to(torch.int32)


# tokens per program of the SLA backward's d kv reduction (_sla_bwd_dstate_kernel): programs for every SM, few atomics
_LINEAR_CHUNK = 512


@triton_op("lite3r::sla_bwd", mutates_args={})
def _sla_bwd(do_s: Tensor, do_l: Tensor, q: Tensor, k: Tensor, v: Tensor, lut: Tensor, kv: Tensor, ksum: Tensor,
             o_s: Tensor, lse: Tensor, block_q: int, block_k: int,
             feature_map: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dq, dk, dv, d kv, d ksum) for o_s (sparse) and o_l (linear; its k, v part flows through kv/ksum)."""
    B, H, N, D = q.shape
    n_q, kept = lut.shape[2], lut.shape[3]
    n_k = -(-N // block_k)
    do_s, do_l = do_s.contiguous(), do_l.contiguous()
    dq = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    dkv = torch.zeros_like(kv)
    dks = torch.zeros_like(ksum)
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    tiles = dict(BLOCK_Q=block_q, BLOCK_K=block_k, TILE_Q=_tile(block_q), TILE_K=_tile(block_k), TILE_D=_tile(D))
    warps = 4 if max(tiles["TILE_Q"], tiles["TILE_K"], tiles["TILE_D"]) <= 64 else 8
    f32 = _full_fp32(q)
    wrap_triton(_sla_bwd_dq_kernel)[(n_q, B * H)](
        q, k, v, lut, kv, ksum, o_s, do_s, do_l, lse, delta, dq, *strides,
        N, H, D, n_q, kept, SM_SCALE=D ** -0.5, EPS=LINEAR_EPS, FM=feature_map, F32=f32, num_warps=warps,
        num_stages=2, **tiles)
    wrap_triton(_sla_bwd_dstate_kernel)[(triton.cdiv(N, _LINEAR_CHUNK), B * H)](
        q, kv, ksum, do_l, dkv, dks, N, H, D, q.stride(0), q.stride(1), q.stride(2),
        EPS=LINEAR_EPS, CHUNK=_LINEAR_CHUNK, TILE_N=_LINEAR_TILE, TILE_D=_tile(D), FM=feature_map, F32=f32,
        num_warps=4)
    offsets, counts, qidx = transpose_lut(lut, n_k)
    # a key block is kept by 0..Mq query blocks: launch each head's key blocks busiest first (longest job first
    # balances the SMs; heads stay in order so the q / dO blocks a head's programs share stay in L2)
    order = (counts.view(B * H, n_k).argsort(dim=1, descending=True)
             + torch.arange(B * H, device=q.device)[:, None] * n_k).to(torch.int32)
    wrap_triton(_sla_bwd_dkdv_kernel)[(B * H * n_k,)](
        q, k, v, do_s, lse, delta, order, offsets, counts, qidx, dk, dv, *strides,
        N, H, D, n_k, SM_SCALE=D ** -0.5, F32=f32, num_warps=warps, num_stages=2, **tiles)
    return dq, dk, dv, dkv, dks


def _fwd_setup(ctx, inputs, output) -> None:
    q, k, v, lut, kv, ksum, block_q, block_k, feature_map = inputs
    o_s, _, lse = output
    ctx.save_for_backward(q, k, v, lut, kv, ksum, o_s, lse)
    ctx.cfg = (block_q, block_k, feature_map)


def _fwd_backward(ctx, do_s, do_l, dlse):
    q, k, v, lut, kv, ksum, o_s, lse = ctx.saved_tensors
    do_s = torch.zeros_like(o_s) if do_s is None else do_s
    do_l = torch.zeros_like(o_s) if do_l is None else do_l
    dq, dk, dv, dkv, dks = torch.ops.lite3r.sla_bwd(do_s, do_l, q, k, v, lut, kv, ksum, o_s, lse, *ctx.cfg)
    return dq, dk, dv, None, dkv, dks, None, None, None


_sla_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


OVERLAP = True  # eager CUDA: the linear state on a side stream while the block map runs (False: one stream)
_SIDE_STREAMS: dict = {}


def _side_stream(t: Tensor):
    """The side stream of t's GPU, or None (OVERLAP off, CPU, or inside torch.compile's tracing, where the graph
    is one stream)."""
    if torch.compiler.is_compiling() or not OVERLAP or not t.is_cuda or is_fake(t):
        return None
    if t.device not in _SIDE_STREAMS:
        _SIDE_STREAMS[t.device] = torch.cuda.Stream(t.device)
    return _SIDE_STREAMS[t.device]


def sla_output(q: Tensor, k: Tensor, v: Tensor, *, topk: float, block_q: int = 64, block_k: int = 64,
               feature_map: str = "softmax", weight: Tensor, bias: Tensor | None = None,
               lut: Tensor | None = None) -> Tensor:
    """o_s + o_l @ weight^T + bias, [B, H, N, D] in q.dtype, in one buffer: SLA with its proj_l at inference (not
    differentiable). proj_l is folded into the linear state - o_l = phi(q) kv / (phi(q) . ksum + eps) is linear in
    kv, so kv @ W^T + ksum (x) b gives proj_l(o_l) up to the eps's share of the bias - and the kernel writes the
    sum: no o_l, no proj_l(o_l), no sum tensors (three [B, H, N, D] at every SLA layer otherwise)."""
    q, k, v, lut, kv, ksum, fm = _forward_inputs(q, k, v, topk, block_q, block_k, feature_map, lut)
    w = weight.to(torch.float32)
    kv = kv.float() @ w.t()
    if bias is not None:
        kv = kv + ksum.float()[..., :, None] * bias.to(torch.float32)
    return torch.ops.lite3r.sla_fwd_sum(q, k, v, lut, kv.contiguous(), ksum.contiguous(), int(block_q),
                                        int(block_k), fm)


def sla_branches(q: Tensor, k: Tensor, v: Tensor, *, topk: float, block_q: int = 64, block_k: int = 64,
                 feature_map: str = "softmax", lut: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(o_s, o_l), both [B, H, N, D] in q.dtype, differentiable in q, k, v (lut is not): o_s exact softmax
    attention (scale D**-0.5) over each query block's kept key blocks, o_l linear attention over all keys.

    q, k, v: [B, H, N, D] float32/float16/bfloat16, last dim contiguous (other strides are fine). lut: int32
    [B, H, Mq, K] of key-block indices (default: sla_block_map(q, k, topk=topk, ...))."""
    q, k, v, lut, kv, ksum, fm = _forward_inputs(q, k, v, topk, block_q, block_k, feature_map, lut)
    o_s, o_l, _ = torch.ops.lite3r.sla_fwd(q, k, v, lut, kv.contiguous(), ksum.contiguous(), int(block_q),
                                           int(block_k), fm)
    return o_s, o_l


def _forward_inputs(q: Tensor, k: Tensor, v: Tensor, topk: float, block_q: int, block_k: int, feature_map: str,
                    lut: Tensor | None):
    """(q, k, v, lut, kv, ksum, feature-map code) the forward kernels take: checked, the linear state and the
    block map computed (the state on a side stream beside the map in eager CUDA)."""
    _check_qkv(q, k, v, block_q, block_k)
    fm = _fm_code(feature_map)
    B, H, N, D = q.shape
    n_q, n_k = -(-N // block_q), -(-N // block_k)
    if lut is not None and (lut.dim() != 4 or tuple(lut.shape[:3]) != (B, H, n_q) or not 1 <= lut.shape[3] <= n_k):
        raise ValueError(f"lut has shape {tuple(lut.shape)}, expected [{B}, {H}, {n_q}, K] with 1 <= K <= {n_k}")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    side = _side_stream(k) if lut is None else None
    if side is None:
        kv, ksum = linear_state(k, v, feature_map)
    else:  # the linear state beside the block map: both are latency-bound, together they fill the GPU better
        main = torch.cuda.current_stream(k.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            kv, ksum = linear_state(k, v, feature_map)
    if lut is None:
        lut = sla_block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    if side is not None:
        main.wait_stream(side)  # kv / ksum are read only after this, and the next call's side work waits for main
    lut = lut.to(torch.int32).contiguous()
    return q, k, v, lut, kv, ksum, fm
