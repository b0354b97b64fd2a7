"""SLA block map: which K key blocks each query block keeps (op `lite3r::sla_block_map`).

    lut = sla_block_map(q, k, topk=0.05, block_q=64, block_k=64)          # int32 [B, H, Mq, K]

`_pool_kernel` averages q and k per block (fp32; k's partial sums over tokens too, for the centring);
`_block_scores_kernel` writes the [Mq, Mk] block scores (tf32x3 MMAs: fp32-level error); `_select_kernel` takes
each score row's top K exactly (bracketed search over order-preserving keys, guessed probes first; long rows write
their indices chunk by chunk). The scores are never held whole past _SCORE_BUDGET bytes: larger maps are scored and
selected one tile of query-block rows (and heads) at a time, so memory is the LUT plus one tile at any N. Reference:
lite3r.sla_block_map (tests/test_kernels.py compares the two).
"""
import math
import statistics

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from .. import interpreting
from .common import _check_qkv, _last_dim_contiguous, _tile


# ---------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _pool_kernel(X, OUT, TOTAL, N, H, M, sx_b, sx_h, sx_n, D, BLOCK: tl.constexpr, TILE: tl.constexpr,
                 TILE_D: tl.constexpr, BLOCKS: tl.constexpr, TOTALS: tl.constexpr):
    """OUT[bh, i, :] = mean of x over the real tokens of block i (fp32), BLOCKS blocks per program (enough bytes per
    program to stream at bandwidth); TOTALS: also writes the program's token sum to TOTAL[bh, program, :], summed in
    a fixed order afterwards (atomic adds sum in a varying order: the centring's last bits, and so the kept set at
    near-ties, would change from run to run). Grid (cdiv(M, BLOCKS), B*H)."""
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
        tl.store(TOTAL + (i_bh.to(tl.int64) * tl.num_programs(0) + i_p) * D + o_d, b_tot, mask=m_d)


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
def _count_keys(p_row, MK, probe, o_k, TILE_MK: tl.constexpr, STRICT: tl.constexpr):
    """How many keys of the row at p_row (MK fp32 scores) are >= probe (> probe when STRICT), in TILE_MK-key chunks."""
    cnt = tl.full([], 0, tl.int32)
    for c0 in range(0, MK, TILE_MK):
        m_c = (c0 + o_k) < MK
        c_key = tl.where(m_c, _key(tl.load(p_row + c0 + o_k, mask=m_c, other=0.0)), tl.full([], 0, tl.uint32))
        if STRICT:
            m_sel = c_key > probe
        else:
            m_sel = c_key >= probe
        cnt += tl.sum(m_sel.to(tl.int32), axis=0)
    return cnt


@triton.jit
def _select_kernel(S, LUT, MK, LD, KK, Z: tl.constexpr, DENSITY: tl.constexpr, GUESSES: tl.constexpr,
                   TILE_MK: tl.constexpr, FUSED_STATS: tl.constexpr, FINAL_CHUNK: tl.constexpr,
                   CHUNKED: tl.constexpr):
    """Grid (rows,): the indices of the KK largest of each row of the scores S [rows, MK] (fp32, row stride LD),
    ascending, into LUT [rows, KK]; ties go to the lowest index.

    Exact: the KK-th largest is bracketed in order-preserving uint32 keys, [lo, hi] with #(key >= lo) >= KK >
    #(key > hi), and the search stops as soon as a probe has exactly KK keys at or above it. The first GUESSES
    probes are guessed: the normal quantile mean + Z std, then secant steps on the row's count curve (initial
    slope: DENSITY = MK pdf(Z) per std), the value midpoint of the bracket when a guess leaves it; 4-6 probes on
    typical rows instead of the ~16 of plain bisection. Then bisection of the keys, so every row ends.
    FINAL_CHUNK > 0: the indices are written by a pass over the row in chunks of that many keys, re-read from memory
    (L1/L2), instead of from the whole tile in registers: a prefix sum over the tile holds the registers that bound
    how many rows an SM runs at once. CHUNKED: rows longer than TILE_MK (no limit on MK): the statistics and every
    probe's count are accumulated over the row in TILE_MK-key chunks re-read from memory (FINAL_CHUNK > 0 then)."""
    i_r = tl.program_id(0).to(tl.int64)
    o_k = tl.arange(0, TILE_MK)
    if CHUNKED:
        lo = tl.full([], 0xFFFFFFFF, tl.uint32)
        hi = tl.full([], 0, tl.uint32)
        s1 = tl.full([], 0.0, tl.float32)
        s2 = tl.full([], 0.0, tl.float32)
        for c0 in range(0, MK, TILE_MK):
            m_c = (c0 + o_k) < MK
            c_s = tl.load(S + i_r * LD + c0 + o_k, mask=m_c, other=0.0)
            c_key = tl.where(m_c, _key(c_s), tl.full([], 0, tl.uint32))
            lo = tl.minimum(lo, tl.min(tl.where(m_c, c_key, tl.full([], 0xFFFFFFFF, tl.uint32)), axis=0))
            hi = tl.maximum(hi, tl.max(c_key, axis=0))
            s1 += tl.sum(c_s, axis=0)
            s2 += tl.sum(c_s * c_s, axis=0)
    else:
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
        if CHUNKED:
            cnt = _count_keys(S + i_r * LD, MK, probe, o_k, TILE_MK, False)
        else:
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
        if CHUNKED:
            n_gt = _count_keys(S + i_r * LD, MK, lo, o_k, TILE_MK, True)
        else:
            n_gt = tl.sum((b_key > lo).to(tl.int32), axis=0)
    p_lut = LUT + i_r * KK
    n_sel = 0  # indices written so far
    n_eq = 0  # ties of lo met so far
    if FINAL_CHUNK == 0:  # (never with CHUNKED)
        _write_selected(p_lut, b_key, o_k, m_k, lo, exact, n_sel, n_eq, n_gt, KK)
    else:
        o_c = tl.arange(0, FINAL_CHUNK)
        for c0 in range(0, MK, FINAL_CHUNK):
            m_c = (c0 + o_c) < MK
            c_s = tl.load(S + i_r * LD + c0 + o_c, mask=m_c, other=0.0)
            c_key = tl.where(m_c, _key(c_s), tl.full([], 0, tl.uint32))
            n_sel, n_eq = _write_selected(p_lut, c_key, c0 + o_c, m_c, lo, exact, n_sel, n_eq, n_gt, KK)


# ------------------------------------------------------------------------------------------------ host side
def num_kept(topk: float, n_blocks: int) -> int:
    """K = max(1, ceil(topk * Mk)) kept key blocks per query block, capped at Mk (lite3r's definition)."""
    if not 0.0 < topk <= 1.0:
        raise ValueError(f"topk is the kept fraction of key blocks, in (0, 1]; got {topk}")
    return min(n_blocks, max(1, math.ceil(topk * n_blocks)))


_POOL_BLOCKS = 8  # blocks per pooling program: enough bytes per program to stream at bandwidth


def _block_means(x: Tensor, block: int, totals: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """[B, H, N, D] -> fp32 [B*H, M, D]: per-block means over the real tokens (Triton); with `totals`, also the sum
    over all N tokens, fp32 [B*H, D] (deterministic: per-program partial sums, then one torch sum)."""
    B, H, N, D = x.shape
    m = -(-N // block)
    programs = triton.cdiv(m, _POOL_BLOCKS)
    out = torch.empty((B * H, m, D), device=x.device, dtype=torch.float32)
    partial = torch.empty((B * H, programs, D), device=x.device, dtype=torch.float32) if totals else out
    wrap_triton(_pool_kernel)[(programs, B * H)](
        x, out, partial, N, H, m, x.stride(0), x.stride(1), x.stride(2), D,
        BLOCK=block, TILE=_tile(block), TILE_D=_tile(D), BLOCKS=_POOL_BLOCKS, TOTALS=totals, num_warps=2)
    return (out, partial.sum(dim=1)) if totals else out


_SELECT_MAX_TILE = 16384  # key blocks one select program holds in registers; longer rows are read in chunks
_SELECT_CHUNK = 4096  # keys per chunk of those longer rows (the measured 4096-key tile's launch settings)
_GUESSED_PROBES = 10


def _select_launch(n_k: int) -> tuple[int, int, int, int | None, bool]:
    """(TILE_MK, num_warps, FINAL_CHUNK, maxnreg, CHUNKED) of the select kernel for rows of n_k scores. The tile is at
    least one element per thread (tiles with replicated elements wrote wrong indices on an H200, Triton 3.6); rows
    of 4096-key tiles and longer write their indices in 512-key chunks (see _select_kernel) at <= 64 registers per
    thread, so more rows run at once on an SM (measured choices: docs/benchmarks.md, kernel tuning history). Rows
    over _SELECT_MAX_TILE keys (past 16384 key blocks: 1024 VGGT views have 21984) are counted in chunks of
    _SELECT_CHUNK keys with the 4096-key tile's settings: no limit on the row length, registers as for 4096."""
    tile = _tile(n_k)
    if tile > _SELECT_MAX_TILE:
        tile = min(_SELECT_CHUNK, _SELECT_MAX_TILE)
        warps = min(16, max(4, tile // 1024))
        return max(tile, 32 * warps), warps, min(512, tile), 64, True
    warps = 2 if tile == 1024 else min(16, max(4, tile // 1024))
    tile = max(tile, 32 * warps)
    return (tile, warps, 512, 64, False) if tile >= 4096 else (tile, warps, 0, None, False)


def _normal_quantile(kept: int, n: int) -> tuple[float, float]:
    """(z, n pdf(z)) with P(X > z) = kept / n for a standard normal X (clamped half a block from 0 and 1): the
    select kernel's first probe and the slope of its count curve."""
    nd = statistics.NormalDist()
    z = nd.inv_cdf(min(max(1.0 - kept / n, 0.5 / n), 1.0 - 0.5 / n))
    return round(z, 4), round(n * nd.pdf(z), 4)


# (query blocks, key blocks, warps) per score program at D <= 64: the fastest measured (docs/benchmarks.md)
_SCORE_TILES = (64, 128, 4)
# bytes of fp32 scores held at once: maps up to this size are scored whole (one score + one select launch), larger
# ones tile by tile (the whole map is (N / 64)^2 floats per head: ~29 GB per layer at 1024 VGGT views)
_SCORE_BUDGET = 128 << 20


def _score_ld(n_k: int) -> int:
    # rows padded to a multiple of 16 floats: 64-byte aligned, so the score stores and the select kernel's row loads
    # vectorise (Triton specialises a stride divisible by 16; 687 or 2748 key blocks are not)
    return -(-n_k // 16) * 16


def score_tile(bh: int, n_q: int, n_k: int) -> tuple[int, int]:
    """(heads, query-block rows) of one score tile: the most that fit _SCORE_BUDGET (whole heads first, then rows of
    one head; at least one row, the only case past the budget: a single row over it, Mk > 33M key blocks)."""
    rows = max(1, _SCORE_BUDGET // (4 * _score_ld(n_k)))
    return (min(bh, rows // n_q), n_q) if rows >= n_q else (1, rows)


def _pooled(q: Tensor, k: Tensor, block_q: int, block_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 (block means of q [B*H, Mq, D], of k [B*H, Mk, D], sum of k over N [B*H, D]) (two pooling launches)."""
    means_q = _block_means(_last_dim_contiguous(q), block_q)
    means_k, ksum = _block_means(_last_dim_contiguous(k), block_k, totals=True)  # ksum: for the centring
    return means_q, means_k, ksum


def _score_launch(means_q: Tensor, means_k: Tensor, ksum: Tensor, N: int, out: Tensor) -> None:
    """out (fp32, contiguous [G, R, ld]) = the scores of the R query blocks of means_q [G, R, D] against every key
    block of means_k [G, Mk, D] (one score launch)."""
    g, n_q, D = means_q.shape
    n_k, ld = means_k.shape[1], out.shape[-1]
    tile_d = _tile(D)
    tile_m, tile_n, warps = _SCORE_TILES if tile_d <= 64 else (32, 64, 4)
    wrap_triton(_block_scores_kernel)[(triton.cdiv(n_q, tile_m), triton.cdiv(n_k, tile_n), g)](
        means_q, means_k, ksum, out, N, n_q, n_k, ld, D, TILE_M=tile_m, TILE_N=tile_n, TILE_D=tile_d,
        PRECISION="ieee" if interpreting() else "tf32x3", num_warps=warps)


def block_scores(q: Tensor, k: Tensor, block_q: int, block_k: int) -> Tensor:
    """fp32 [B, H, Mq, Mk] (a view of rows padded to 16 floats): mean-pooled q of each query block . mean-pooled
    centred k of each key block, all of it at once (sla_block_map tiles past _SCORE_BUDGET)."""
    B, H, N, D = q.shape
    means_q, means_k, ksum = _pooled(q, k, block_q, block_k)
    n_q, n_k = means_q.shape[1], means_k.shape[1]
    scores = torch.empty((B, H, n_q, _score_ld(n_k)), device=q.device, dtype=torch.float32)
    _score_launch(means_q, means_k, ksum, N, scores.view(B * H, n_q, -1))
    return scores[..., :n_k]


def tiled_block_map(q: Tensor, k: Tensor, kept: int, block_q: int, block_k: int) -> Tensor:
    """int32 [B, H, Mq, kept]: block_scores + select_top one score_tile at a time, into one reused fp32 buffer of at
    most _SCORE_BUDGET bytes (the same scores row for row: each row's dot products do not depend on the tile)."""
    B, H, N, D = q.shape
    means_q, means_k, ksum = _pooled(q, k, block_q, block_k)
    bh, n_q, n_k = B * H, means_q.shape[1], means_k.shape[1]
    ld = _score_ld(n_k)
    heads, rows = score_tile(bh, n_q, n_k)
    buf = torch.empty(heads * rows * ld, device=q.device, dtype=torch.float32)
    lut = torch.empty((bh, n_q, kept), device=q.device, dtype=torch.int32)
    for h0 in range(0, bh, heads):
        g = min(heads, bh - h0)
        for r0 in range(0, n_q, rows):
            r = min(rows, n_q - r0)
            scores = buf[:g * r * ld].view(g, r, ld)
            _score_launch(means_q[h0:h0 + g, r0:r0 + r].contiguous(), means_k[h0:h0 + g], ksum[h0:h0 + g], N,
                          scores)
            lut[h0:h0 + g, r0:r0 + r] = select_top(scores[..., :n_k], kept)
    return lut.view(B, H, n_q, kept)


def select_top(scores: Tensor, kept: int) -> Tensor:
    """int32 [..., kept]: the indices of the `kept` largest of each row of fp32 `scores` [..., Mk], ascending, ties
    to the lowest index (one select program per row; rows over _SELECT_MAX_TILE long: torch.topk, unordered)."""
    n_k = scores.shape[-1]
    tile, warps, final_chunk, maxnreg, chunked = _select_launch(n_k)  # maxnreg: not through torch's tracing
    rows = scores.reshape(-1, n_k)  # a view for block_scores' padded rows
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    lut = torch.empty((*scores.shape[:-1], kept), device=scores.device, dtype=torch.int32)
    z, density = _normal_quantile(kept, n_k)
    wrap_triton(_select_kernel)[(rows.shape[0],)](
        rows, lut, n_k, rows.stride(0), kept, Z=z, DENSITY=density, GUESSES=_GUESSED_PROBES, TILE_MK=tile,
        FUSED_STATS=not interpreting(), FINAL_CHUNK=final_chunk, CHUNKED=chunked, num_warps=warps,
        **({} if maxnreg is None or torch.compiler.is_compiling() or is_fake(rows) else {"maxnreg": maxnreg}))
    return lut


@triton_op("lite3r::sla_block_map", mutates_args={})
def _sla_block_map_op(q: Tensor, k: Tensor, topk: float, block_q: int, block_k: int) -> Tensor:
    B, H, N, _ = q.shape
    n_q, n_k = -(-N // block_q), -(-N // block_k)
    kept = num_kept(topk, n_k)
    if score_tile(B * H, n_q, n_k) != (B * H, n_q):  # the whole score tensor would be over _SCORE_BUDGET
        return tiled_block_map(q, k, kept, block_q, block_k)
    return select_top(block_scores(q, k, block_q, block_k), kept)  # [B, H, Mq, Mk] scores, one select launch


def sla_block_map(q: Tensor, k: Tensor, *, topk: float, block_q: int = 64, block_k: int = 64) -> Tensor:
    """LUT int32 [B, H, Mq, K]: for each query block the indices (unordered) of its K kept key blocks. Same
    definition as lite3r.sla_block_map (mean-pooled q . mean-pooled centred k, fp32, top-K)."""
    _check_qkv(q, k, k, block_q, block_k)
    return torch.ops.lite3r.sla_block_map(q.detach(), k.detach(), float(topk), int(block_q), int(block_k))
