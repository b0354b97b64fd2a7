"""Fused Sparse-Linear Attention (SLA): block map, forward and backward as Triton kernels behind torch.library ops.

Shapes: B batch, H heads, N tokens, D head dim, Mq/Mk query/key blocks, K kept key blocks per query block.

    lut = sla_block_map(q, k, topk=0.05, block_q=64, block_k=64)          # int32 [B, H, Mq, K]
    o_s, o_l = sla_branches(q, k, v, topk=0.05, block_q=64, block_k=64, feature_map="softmax")

Block map: `_pool_kernel` averages q and k per block (fp32; k's sum over all tokens too, for the centring);
`_block_scores_kernel` writes the [Mq, Mk] block scores (tf32x3 MMAs: fp32-level error); `_select_kernel` takes
each score row's top K exactly (bracketed search over order-preserving keys, guessed probes first; long rows write
their indices chunk by chunk). The score matrix is (N / 64)^2 floats, nothing N x N.
Forward (`_sla_fwd_kernel`): one program per (query block, batch*head) walks the K kept key blocks of its LUT row
with an online softmax, STEP blocks gathered into one tile per update (o_s, and the row log-sum-exp for backward;
an unmasked EVEN variant when every block is full), and computes the linear branch
phi(q) (phi(k)^T v) / (phi(q) . sum phi(k) + eps) from kv = phi(k)^T v [D, D] and ksum [D], precomputed by
`_linear_state_kernel` in one pass over k and v (backward: `_linear_state_bwd_kernel`, per token tile). When every
block is full the kept key/value blocks come through TMA descriptors (`USE_TMA`; eager only: torch's tracing of a
triton_op cannot capture a descriptor, so compiled graphs use pointer loads), and in eager CUDA `sla_branches` runs
the linear state on a side stream beside the block map (`OVERLAP`).
Backward: `_sla_bwd_dq_kernel` per query block recomputes P from the LSE (dq of both branches, per-row work only);
`_sla_bwd_dstate_kernel` per chunk of tokens sums d kv and d ksum (one atomic add per chunk);
`_sla_bwd_dkdv_kernel` per key block walks the query blocks that selected it (the transposed LUT, CSR) for dk and
dv of the sparse branch, busiest key blocks launched first.

Tiles: a block of `block_q` (`block_k`) tokens is held in a power-of-two tile >= 16 rows, D in a power-of-two tile
>= 16 columns; masks handle partial blocks, the partial last block and D not a power of two.
"""
import math
import statistics

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from . import interpreting

try:  # host-side TMA descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor as _TensorDescriptor
except ImportError:
    _TensorDescriptor = None

LINEAR_EPS = 1e-6  # same as lite3r.LINEAR_EPS
FEATURE_MAPS = ("softmax", "elu", "relu")  # kernel code 0, 1, 2
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E); a constexpr so kernels can read it


def _fwd_configs():
    """STEP: kept key blocks per loop step of the forward kernel (one online-softmax update over a [TQ, STEP * TK]
    score tile: fewer row reductions and accumulator rescales, deeper P @ V). On an H100 (docs/benchmarks.md) STEP=2
    beat STEP=1 by 2-7 % at every stage count at 32 and 128 views, 8 warps ran at half the speed (the softmax is done
    in both warpgroups) and STEP=4 spills; on an H200 STEP=2 with 4 stages was the best single config at both sizes,
    2 and 3 stages within 1-5 % of it. maxnreg=168 keeps 3 programs (4 warps each) on an SM's 64K registers: on an
    H200 the session-4 kernel took 176 registers at 3-4 stages (2 programs per SM: 18.3 ms at 128 views, against
    16.6 at 2 stages and 168 registers); the current one runs 161 under the cap at any stage count, no spills. The
    uncapped configs are for the shapes where the cap would spill (D = 128, fp32): _prune_fwd_configs. The
    interpreter runs one config (tests swap `_sla_fwd_kernel.configs` to reach STEP=1)."""
    if interpreting():
        return [triton.Config({"STEP": 2}, num_warps=4, num_stages=1)]
    return [triton.Config({"STEP": 2}, num_warps=4, num_stages=n, maxnreg=r) for n in (2, 3, 4) for r in (168, None)]


def _prune_fwd_configs(configs, named_args, **kwargs):
    """The 168-register cap for bf16/fp16 at D <= 64 (the shapes it was measured on), no cap elsewhere: a choice
    made here, not by timing, because the autotuner's short timings once took an uncapped 2-programs-per-SM config
    (18.1 ms against 16.7 at 128 views)."""
    args = {**named_args, **kwargs}  # the constexprs come as keywords
    capped = args["TILE_D"] <= 64 and not args["F32"]
    kept = [c for c in configs if (c.maxnreg is not None) == capped]
    return kept or configs


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _pool_kernel(X, OUT, TOTAL, N, H, M, sx_b, sx_h, sx_n, D, BLOCK: tl.constexpr, TILE: tl.constexpr,
                 TILE_D: tl.constexpr, BLOCKS: tl.constexpr, TOTALS: tl.constexpr):
    """OUT[bh, i, :] = mean of x over the real tokens of block i (fp32), BLOCKS blocks per program (enough bytes per
    program to stream at bandwidth); TOTALS: also adds the program's token sum into TOTAL[bh, :] (zero-initialised).
    Grid (cdiv(M, BLOCKS), B*H)."""
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, TILE_D)
    m_d = o_d < D
    x_base = X + i_b.to(tl.int64) * sx_b + i_h.to(tl.int64) * sx_h
    b_tot = tl.zeros([TILE_D], dtype=tl.float32)
    for i_m in range(i_p * BLOCKS, tl.minimum(i_p * BLOCKS + BLOCKS, M)):
        o_n = i_m * BLOCK + tl.arange(0, TILE)
        m_n = (tl.arange(0, TILE) < BLOCK) & (o_n < N)
        b_x = tl.load(x_base + o_n[:, None].to(tl.int64) * sx_n + o_d[None, :], mask=m_n[:, None] & m_d[None, :],
                      other=0.0).to(tl.float32)  # [TILE, TD]
        b_s = tl.sum(b_x, axis=0)
        b_tot += b_s
        count = tl.minimum(N - i_m * BLOCK, BLOCK).to(tl.float32)  # >= 1: block i_m starts before N
        tl.store(OUT + (i_bh.to(tl.int64) * M + i_m) * D + o_d, b_s / count, mask=m_d)
    if TOTALS:
        tl.atomic_add(TOTAL + i_bh.to(tl.int64) * D + o_d, b_tot, mask=m_d)


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
    if FM == 0:  # softmax over D; one reciprocal per row (a division per element made the linear state 25 % slower)
        b_x = tl.where(m_d[None, :], b_x, float("-inf"))
        b_e = tl.math.exp2((b_x - tl.max(b_x, axis=1)[:, None]) * LOG2E)
        b_f = b_e * (1.0 / tl.sum(b_e, axis=1))[:, None]
    elif FM == 1:  # elu + 1
        b_f = tl.where(b_x > 0, b_x + 1.0, tl.exp(tl.minimum(b_x, 0.0)))
    else:  # relu
        b_f = tl.maximum(b_x, 0.0)
    return tl.where(m_d[None, :], b_f, 0.0)


@triton.jit
def _linear_num(b_f, b_kv, F32: tl.constexpr):
    """phi(q) @ kv for an fp32 [TQ, TD] tile b_f >= 0 and fp32 kv [TD, TD]. Unless F32: fp16 operands, each row of
    b_f and all of kv scaled to at most 1 in magnitude first (kv sums over all N tokens and can pass fp16's range):
    the rounding of tf32 (10-bit mantissas), without tf32's fp32 operand registers; bf16 operands (7 bits) had 8x
    its error (docs/benchmarks.md, session 5)."""
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
                    TMA: tl.constexpr, STEP: tl.constexpr, F32: tl.constexpr):
    """Grid (Mq, B*H). OS/OL: [B, H, N, D] contiguous, LSE: [B, H, N] fp32 (log2 units). EVEN: blocks are full
    tiles of real tokens (BLOCK_Q = TILE_Q and BLOCK_K = TILE_K divide N) and D = TILE_D: no masks at all. TMA
    (EVEN only): K and V are TMA descriptors of [B, H, N, D] (the sk_*/sv_* strides are unused)."""
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
    _store(OS + o_out, b_os.to(OS.dtype.element_ty), m_qd, EVEN)
    _store(LSE + i_bh.to(tl.int64) * N + o_q, b_m + tl.math.log2(b_l), m_q, EVEN)
    if LINEAR:
        # q times the identity: an exact fp32 copy of q in the MMA result layout, where phi's row reductions take 2
        # shuffles (q as loaded took ~400 shuffles and ~80 more registers, which capped the forward at 2 programs
        # per SM: docs/benchmarks.md, session 5)
        b_eye = (o_d[:, None] == o_d[None, :]).to(tl.float32 if F32 else b_q.dtype)
        b_f = _phi(_dot(b_q, b_eye, F32), m_d, FM)  # [TQ, TD]
        o_dd = o_d[:, None] * D + o_d[None, :]
        b_kv = _load(KV + i_bh.to(tl.int64) * D * D + o_dd, m_d[:, None] & m_d[None, :], EVEN)  # [TD, TD]
        b_ks = _load(KS + i_bh.to(tl.int64) * D + o_d, m_d, EVEN)  # [TD]
        b_num = _linear_num(b_f, b_kv, F32)  # [TQ, TD]
        b_den = tl.sum(b_f * b_ks[None, :], axis=1) + EPS
        _store(OL + o_out, (b_num / b_den[:, None]).to(OL.dtype.element_ty), m_qd, EVEN)


@triton.jit
def _phi_bwd(b_x, b_f, b_df, FM: tl.constexpr):
    """d x from d phi (b_df) for an fp32 [rows, TD] tile x with b_f = _phi(x) (zero on padded columns)."""
    if FM == 0:
        return b_f * (b_df - tl.sum(b_df * b_f, axis=1)[:, None])
    elif FM == 1:
        return tl.where(b_x > 0, b_df, b_df * b_f)
    else:
        return tl.where(b_x > 0, b_df, 0.0)


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
        b_kv += _dot(tl.trans(b_f.to(b_v.dtype)), b_v, F32)  # in the input dtype (bf16: 1.6x faster than tf32)
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


@triton.jit
def _block_scores_kernel(MQ_, MK_, KSUM, S, N, MQ, MK, LD, D, TILE_M: tl.constexpr, TILE_N: tl.constexpr,
                         TILE_D: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (cdiv(MQ, TILE_M), cdiv(MK, TILE_N), B*H): S[bh, i, j] = mean q of block i . (mean k of block j - mean
    of k over all N tokens), fp32, from the block means MQ_ [B*H, MQ, D] / MK_ [B*H, MK, D] and KSUM [B*H, D] (sum of
    k over N). PRECISION "tf32x3" (three tf32 MMAs, fp32-level error) on the GPU, "ieee" in the interpreter."""
    i_m, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * TILE_M + tl.arange(0, TILE_M)
    o_n = i_n * TILE_N + tl.arange(0, TILE_N)
    o_d = tl.arange(0, TILE_D)
    m_d = o_d < D
    b_q = tl.load(MQ_ + (i_bh.to(tl.int64) * MQ + o_m[:, None]) * D + o_d[None, :],
                  mask=(o_m < MQ)[:, None] & m_d[None, :], other=0.0)  # [TM, TD]
    b_mu = tl.load(KSUM + i_bh.to(tl.int64) * D + o_d, mask=m_d, other=0.0) / N  # [TD]
    b_k = tl.load(MK_ + (i_bh.to(tl.int64) * MK + o_n[:, None]) * D + o_d[None, :],
                  mask=(o_n < MK)[:, None] & m_d[None, :], other=0.0) - b_mu[None, :]  # [TN, TD]
    b_s = tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)  # [TM, TN]
    tl.store(S + (i_bh.to(tl.int64) * MQ + o_m[:, None]) * LD + o_n[None, :], b_s,
             mask=(o_m < MQ)[:, None] & (o_n < MK)[None, :])


@triton.jit
def _key(x):
    """fp32 -> uint32 with the same order (finite values map above 0)."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = tl.full([], 0x80000000, tl.uint32)
    return tl.where((bits & sign) != 0, ~bits, bits | sign)


@triton.jit
def _unkey(key):
    """Inverse of _key."""
    sign = tl.full([], 0x80000000, tl.uint32)
    return tl.where((key & sign) != 0, key ^ sign, ~key).to(tl.float32, bitcast=True)


@triton.jit
def _row_stats(lo_a, hi_a, s1_a, s2_a, lo_b, hi_b, s1_b, s2_b):
    return tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b), s1_a + s1_b, s2_a + s2_b


@triton.jit
def _write_selected(p_lut, key, idx, valid, lo, exact, n_sel, n_eq, n_gt, KK):
    """Writes the indices idx of a tile's selected keys, in order, from p_lut[n_sel] on: the keys >= lo when
    `exact`, else the keys > lo and the first KK - n_gt ties of lo overall (n_eq ties were in earlier tiles).
    Returns (n_sel, n_eq) after this tile."""
    m_sel = key >= lo
    if not exact:
        m_eq = (key == lo) & valid
        m_sel = (key > lo) | (m_eq & (n_eq + tl.cumsum(m_eq.to(tl.int32), axis=0) <= KK - n_gt))
        n_eq += tl.sum(m_eq.to(tl.int32), axis=0)
    tl.store(p_lut + n_sel + tl.cumsum(m_sel.to(tl.int32), axis=0) - 1, idx, mask=m_sel)
    return n_sel + tl.sum(m_sel.to(tl.int32), axis=0), n_eq


@triton.jit
def _select_kernel(S, LUT, MK, LD, KK, Z: tl.constexpr, DENSITY: tl.constexpr, GUESSES: tl.constexpr,
                   TILE_MK: tl.constexpr, FUSED_STATS: tl.constexpr, FINAL_CHUNK: tl.constexpr):
    """Grid (rows,): the indices of the KK largest of each row of the scores S [rows, MK] (fp32, row stride LD),
    ascending, into LUT [rows, KK]; ties go to the lowest index.

    Exact: the KK-th largest is bracketed in order-preserving uint32 keys, [lo, hi] with #(key >= lo) >= KK >
    #(key > hi), and the search stops as soon as a probe has exactly KK keys at or above it. The first GUESSES
    probes are guessed: the normal quantile mean + Z std, then secant steps on the row's count curve (initial
    slope: DENSITY = MK pdf(Z) per std), the value midpoint of the bracket when a guess leaves it; 4-6 probes on
    typical rows instead of the ~16 of plain bisection. Then bisection of the keys, so every row ends.
    FINAL_CHUNK > 0: the indices are written by a pass over the row in chunks of that many keys, re-read from memory
    (L1/L2), instead of from the whole tile in registers: a prefix sum over the tile holds the registers that bound
    how many rows an SM runs at once (H200, 2748-wide rows: 0.69 vs 0.87 ms; 687-wide: 0.061 vs 0.055)."""
    i_r = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, TILE_MK)
    m_k = o_k < MK
    b_s = tl.load(S + i_r * LD + o_k, mask=m_k, other=0.0)
    b_key = tl.where(m_k, _key(b_s), tl.full([], 0, tl.uint32))  # padding: below every real key
    b_lo = tl.where(m_k, b_key, tl.full([], 0xFFFFFFFF, tl.uint32))
    if FUSED_STATS:  # one block-wide reduction for min, max, sum, sum of squares
        lo, hi, s1, s2 = tl.reduce((b_lo, b_key, b_s, b_s * b_s), 0, _row_stats)
    else:  # the interpreter runs a combine function element by element: four built-in reductions there
        lo, hi, s1, s2 = tl.min(b_lo, axis=0), tl.max(b_key, axis=0), tl.sum(b_s, axis=0), tl.sum(b_s * b_s, axis=0)
    mean = s1 / MK
    std = tl.sqrt(tl.maximum(s2 / MK - mean * mean, 0.0))
    t = mean + Z * std  # next guess (value)
    slope = std / DENSITY  # value per key counted
    t_prev = t
    c_prev = -1
    exact = MK == KK  # a probe reached exactly KK keys (or all are kept: no search)
    hi = tl.where(exact, lo, hi)
    one = tl.full([], 1, tl.uint32)
    step = 0
    while lo < hi:
        gap = hi - lo
        probe = lo + (gap >> 1) + (gap & 1)  # bisection: in (lo, hi]
        if step < GUESSES:
            v_lo = _unkey(lo)
            v_hi = _unkey(hi)
            if (t <= v_lo) | (t >= v_hi) | (t != t):  # outside the bracket, or NaN
                t = 0.5 * v_lo + 0.5 * v_hi
            probe = tl.minimum(tl.maximum(_key(t), lo + one), hi)
        cnt = tl.sum((b_key >= probe).to(tl.int32), axis=0)
        lo = tl.where(cnt >= KK, probe, lo)
        hi = tl.where(cnt == KK, probe, tl.where(cnt >= KK, hi, probe - one))
        exact = exact | (cnt == KK)
        t_probe = _unkey(probe)
        if (c_prev >= 0) & (cnt != c_prev) & (t_probe != t_prev):
            slope = tl.abs((t_probe - t_prev) / (c_prev - cnt).to(tl.float32))  # secant
        t = t_probe + (cnt - KK).to(tl.float32) * slope
        t_prev = t_probe
        c_prev = cnt
        step += 1
    n_gt = 0  # keys above lo (only needed when lo is the KK-th largest key itself, with ties)
    if not exact:
        n_gt = tl.sum((b_key > lo).to(tl.int32), axis=0)
    p_lut = LUT + i_r * KK
    n_sel = 0  # indices written so far
    n_eq = 0  # ties of lo met so far
    if FINAL_CHUNK == 0:
        _write_selected(p_lut, b_key, o_k, m_k, lo, exact, n_sel, n_eq, n_gt, KK)
    else:
        o_c = tl.arange(0, FINAL_CHUNK)
        for c0 in range(0, MK, FINAL_CHUNK):
            m_c = (c0 + o_c) < MK
            c_s = tl.load(S + i_r * LD + c0 + o_c, mask=m_c, other=0.0)
            c_key = tl.where(m_c, _key(c_s), tl.full([], 0, tl.uint32))
            n_sel, n_eq = _write_selected(p_lut, c_key, c0 + o_c, m_c, lo, exact, n_sel, n_eq, n_gt, KK)


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


def num_kept(topk: float, n_blocks: int) -> int:
    """K = max(1, ceil(topk * Mk)) kept key blocks per query block, capped at Mk (lite3r's definition)."""
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk is the kept fraction of key blocks, in (0, 1]; got {topk}")
    return min(n_blocks, max(1, math.ceil(topk * n_blocks)))


_POOL_BLOCKS = 8  # blocks per pooling program (H200, 128 views: 2 warps 0.103 ms, 3.5 TB/s; 4 warps 0.140)


def _block_means(x: Tensor, block: int, total: Tensor | None = None) -> Tensor:
    """[B, H, N, D] -> fp32 [B*H, M, D]: per-block means over the real tokens (Triton); `total` (fp32 [B*H, D],
    zeros): gets the sum over all N tokens added."""
    B, H, N, D = x.shape
    m = -(-N // block)
    out = torch.empty((B * H, m, D), device=x.device, dtype=torch.float32)
    wrap_triton(_pool_kernel)[(triton.cdiv(m, _POOL_BLOCKS), B * H)](
        x, out, out if total is None else total, N, H, m, x.stride(0), x.stride(1), x.stride(2), D,
        BLOCK=block, TILE=_tile(block), TILE_D=_tile(D), BLOCKS=_POOL_BLOCKS, TOTALS=total is not None, num_warps=2)
    return out


_SELECT_MAX_TILE = 16384  # key blocks one select program holds in registers; longer rows go to torch.topk
_GUESSED_PROBES = 10


def _select_launch(n_k: int) -> tuple[int, int, int, int | None]:
    """(TILE_MK, num_warps, FINAL_CHUNK, maxnreg) of the select kernel for rows of n_k scores. The tile is at least
    one element per thread: on an H200 a 16-wide tile over 32-128 threads (replicated elements) wrote wrong indices
    once the guessed probes ran, at any warp count (Triton 3.6), while tiles of >= 1 element per thread were exact.
    Rows of 4096-key tiles and longer write their indices chunk by chunk (see _select_kernel) with at most 64
    registers per thread, so more rows run at once on an SM (H200, 2748-key rows: 0.667 ms; 1024-key chunks 0.710
    uncapped (95 registers), 0.689 at 72; 4 warps 0.71, 2 warps 1.07, 8 warps 0.81). 1024-key tiles run 2 warps
    (687-key rows: 0.044 vs 0.055 ms at 4 warps; 1 warp 0.042, capped registers 0.046)."""
    tile = _tile(n_k)
    warps = 2 if tile == 1024 else min(16, max(4, tile // 1024))
    tile = max(tile, 32 * warps)
    return (tile, warps, 512, 64) if tile >= 4096 else (tile, warps, 0, None)


def _normal_quantile(kept: int, n: int) -> tuple[float, float]:
    """(z, n pdf(z)) with P(X > z) = kept / n for a standard normal X (clamped half a block from 0 and 1): the
    select kernel's first probe and the slope of its count curve."""
    nd = statistics.NormalDist()
    z = nd.inv_cdf(min(max(1.0 - kept / n, 0.5 / n), 1.0 - 0.5 / n))
    return round(z, 4), round(n * nd.pdf(z), 4)


# (query blocks, key blocks, warps) per score program at D <= 64; H200, 128 views: (64, 128, 4) 0.61 ms with
# the pooling, (64, 64, 4) 0.65, (128, 64, 8) 0.85 (docs/benchmarks.md, session 4)
_SCORE_TILES = (64, 128, 4)


def block_scores(q: Tensor, k: Tensor, block_q: int, block_k: int) -> Tensor:
    """fp32 [B, H, Mq, Mk] (a view of rows padded to 16 floats): mean-pooled q of each query block . mean-pooled
    centred k of each key block (two pooling launches, one score launch)."""
    B, H, N, D = q.shape
    n_q, n_k = -(-N // block_q), -(-N // block_k)
    means_q = _block_means(_last_dim_contiguous(q), block_q)  # [B*H, Mq, D]
    ksum = torch.zeros((B * H, D), device=q.device, dtype=torch.float32)  # sum of k over N, for the centring
    means_k = _block_means(_last_dim_contiguous(k), block_k, ksum)  # [B*H, Mk, D]
    # rows padded to a multiple of 16 floats: 64-byte aligned, so the score stores and the select kernel's row loads
    # vectorise (Triton specialises a stride divisible by 16; 687 or 2748 key blocks are not)
    ld = -(-n_k // 16) * 16
    scores = torch.empty((B, H, n_q, ld), device=q.device, dtype=torch.float32)
    tile_d = _tile(D)
    tile_m, tile_n, warps = _SCORE_TILES if tile_d <= 64 else (32, 64, 4)
    wrap_triton(_block_scores_kernel)[(triton.cdiv(n_q, tile_m), triton.cdiv(n_k, tile_n), B * H)](
        means_q, means_k, ksum, scores, N, n_q, n_k, ld, D, TILE_M=tile_m, TILE_N=tile_n, TILE_D=tile_d,
        PRECISION="ieee" if interpreting() else "tf32x3", num_warps=warps)
    return scores[..., :n_k]


def select_top(scores: Tensor, kept: int) -> Tensor:
    """int32 [..., kept]: the indices of the `kept` largest of each row of fp32 `scores` [..., Mk], ascending, ties
    to the lowest index (one select program per row; rows over _SELECT_MAX_TILE long: torch.topk, unordered)."""
    n_k = scores.shape[-1]
    tile, warps, final_chunk, maxnreg = _select_launch(n_k)  # maxnreg: not through torch's tracing (uncapped there)
    if tile > _SELECT_MAX_TILE:  # rows too long for one program's registers
        return scores.topk(kept, dim=-1, sorted=False).indices.to(torch.int32)
    rows = scores.reshape(-1, n_k)  # a view for block_scores' padded rows
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    lut = torch.empty((*scores.shape[:-1], kept), device=scores.device, dtype=torch.int32)
    z, density = _normal_quantile(kept, n_k)
    wrap_triton(_select_kernel)[(rows.shape[0],)](
        rows, lut, n_k, rows.stride(0), kept, Z=z, DENSITY=density, GUESSES=_GUESSED_PROBES, TILE_MK=tile,
        FUSED_STATS=not interpreting(), FINAL_CHUNK=final_chunk, num_warps=warps,
        **({} if maxnreg is None or torch.compiler.is_compiling() or is_fake(rows) else {"maxnreg": maxnreg}))
    return lut


@triton_op("lite3r::sla_block_map", mutates_args={})
def _sla_block_map_op(q: Tensor, k: Tensor, topk: float, block_q: int, block_k: int) -> Tensor:
    scores = block_scores(q, k, block_q, block_k)  # [B, H, Mq, Mk]
    return select_top(scores, num_kept(topk, scores.shape[-1]))


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


def sla_block_map(q: Tensor, k: Tensor, *, topk: float, block_q: int = 64, block_k: int = 64) -> Tensor:
    """LUT int32 [B, H, Mq, K]: for each query block the indices (unordered) of its K kept key blocks. Same
    definition as lite3r.sla_block_map (mean-pooled q . mean-pooled centred k, fp32, top-K)."""
    _check_qkv(q, k, k, block_q, block_k)
    return torch.ops.lite3r.sla_block_map(q.detach(), k.detach(), float(topk), int(block_q), int(block_k))


_FWD_MAX_OFFSET = 2**31  # the forward kernel's key/value offsets inside a head are int32
# TMA loads of the kept key/value blocks when every block is full (H200, 128 views: 16.51-16.65 vs 16.71-16.82 ms
# for pointer loads in three runs; 32 views: the same within 1 %); False: pointer loads everywhere (tests and
# benchmarks compare the two)
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
    B, H, N, D = q.shape
    n_q, kept = lut.shape[2], lut.shape[3]
    o_s = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    o_l = torch.empty_like(o_s)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
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
        FM=feature_map, LINEAR=True, EVEN=even, TMA=descriptors is not None, F32=_full_fp32(q))
    return o_s, o_l, lse


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


def _phi_torch(x: Tensor, feature_map: str) -> Tensor:
    if feature_map == "softmax":
        return x.softmax(dim=-1)
    if feature_map == "elu":
        return torch.nn.functional.elu(x) + 1.0
    return torch.relu(x)


# tokens per program of the SLA backward's d kv reduction (_sla_bwd_dstate_kernel):
# N = 43968, 16 heads -> 1376 programs on 132 SMs, 86 fp32 atomic adds per element of kv
_LINEAR_CHUNK = 512
_LINEAR_STATE_CHUNK = 2048  # tokens per linear-state program (fewer atomics on kv; H200: 0.113 vs 0.124 ms at 512;
# 2 stages: 0.33 vs 0.38 ms at 128 views, 8 warps or 128-token tiles slower)
_LINEAR_TILE = 64  # tokens per step inside a chunk (divides both chunks)


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


def linear_state_torch(k: Tensor, v: Tensor, feature_map: str) -> tuple[Tensor, Tensor]:
    """Pure-torch twin of linear_state."""
    fk = _phi_torch(k.float(), feature_map)  # [B, H, N, D]
    return fk.transpose(-1, -2) @ v.float(), fk.sum(dim=2)


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


def sla_branches(q: Tensor, k: Tensor, v: Tensor, *, topk: float, block_q: int = 64, block_k: int = 64,
                 feature_map: str = "softmax", lut: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(o_s, o_l), both [B, H, N, D] in q.dtype, differentiable in q, k, v (lut is not): o_s exact softmax
    attention (scale D**-0.5) over each query block's kept key blocks, o_l linear attention over all keys.

    q, k, v: [B, H, N, D] float32/float16/bfloat16, last dim contiguous (other strides are fine). lut: int32
    [B, H, Mq, K] of key-block indices (default: sla_block_map(q, k, topk=topk, ...))."""
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
    o_s, o_l, _ = torch.ops.lite3r.sla_fwd(q, k, v, lut, kv.contiguous(), ksum.contiguous(), int(block_q),
                                           int(block_k), fm)
    return o_s, o_l
