"""The block map past its score budget (issue 17): scored and selected one tile of query-block rows (and heads) at a
time, by the kernels (Triton interpreter on CPU) and by lite3r's PyTorch reference, with the same kept sets as the
whole-tensor path and never a score tensor over the budget."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import lite3r

kernels = pytest.importorskip("lite3r_kernels")
if not kernels.AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)

from lite3r_kernels.sla import block_map  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = settings(max_examples=int(os.environ.get("LITE3R_KERNEL_EXAMPLES", "6")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


class LargestAllocation(TorchDispatchMode):
    """Records the bytes of the largest tensor any op creates while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def exact_scores(q, k, block_q, block_k):
    """fp64 [B, H, Mq, Mk] block scores by the definition."""
    qd, kd = q.double().cpu(), k.double().cpu()
    return lite3r._block_mean(qd, block_q) @ lite3r._block_mean(kd - kd.mean(dim=2, keepdim=True),
                                                                 block_k).transpose(-1, -2)


def check_selection(lut, want, scores, kept):
    """lut keeps K distinct blocks whose exact scores are the top K up to fp32 rounding, and equals `want` (sorted)
    on every row whose K-th and (K+1)-th exact scores are separated."""
    n_k = scores.shape[-1]
    srt, ref = lut.cpu().sort(dim=-1).values, want.cpu().sort(dim=-1).values
    assert lut.shape == want.shape == (*scores.shape[:-1], kept) and lut.dtype == torch.int32
    assert (srt[..., 1:] > srt[..., :-1]).all() and srt.min() >= 0 and srt.max() < n_k
    top = scores.sort(dim=-1, descending=True).values
    tol = 1e-5 * scores.abs().amax(-1, keepdim=True)
    assert (scores.gather(-1, srt.long()) >= top[..., kept - 1:kept] - tol).all()
    if kept < n_k:
        separated = (top[..., kept - 1] - top[..., kept]) > tol[..., 0]
        assert torch.equal(srt[separated], ref[separated])
    else:
        assert torch.equal(srt, ref)


@FAST
@given(N=st.integers(1500, 2100), D=st.sampled_from([8, 16]), H=st.integers(1, 2), block_q=st.integers(17, 64),
       block_k=st.integers(4, 8), topk=st.floats(0.002, 0.2), tile_rows=st.integers(1, 150),
       long_rows=st.booleans(), seed=st.integers(0, 2**16))
def test_tiled_block_map_equals_whole( N, D, H, block_q, block_k, topk, tile_rows, long_rows, seed):
    """Kernels, Mk of 190-525 key blocks (few query blocks: the interpreter runs one select program per row), tiles
    of `tile_rows` query blocks (odd sizes; whole heads when a head fits): the same LUT, sorted, as
    the whole-tensor path (the same scores row for row), and the reference's kept sets; rows over the select
    kernel's tile (read in 64-key chunks, as past 16384 key blocks) with `long_rows`: identical too. The
    reference tiled the same way keeps the same sets."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, H, N, D, generator=gen).to(DEVICE) for _ in range(2))
    n_q, n_k = -(-N // block_q), -(-N // block_k)
    kept = kernels.sla.num_kept(topk, n_k)
    whole = kernels.sla_block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    ref_whole = lite3r.sla_block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(block_map, "_SCORE_BUDGET", 4 * block_map._score_ld(n_k) * tile_rows)
        mp.setattr(lite3r, "_SCORE_BUDGET", 4 * n_k * tile_rows)
        if long_rows:
            mp.setattr(block_map, "_SELECT_MAX_TILE", 64)
        heads, rows = block_map.score_tile(H, n_q, n_k)
        assert (heads, rows) != (H, n_q) or tile_rows >= H * n_q  # the size rule tiles whenever over budget
        tiled = kernels.sla_block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
        ref_tiled = lite3r.sla_block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    scores = exact_scores(q, k, block_q, block_k)
    assert torch.equal(tiled, whole)  # the select kernel on both paths (rows whole or chunked): identical, ties too
    for got in (tiled, whole, ref_tiled):
        check_selection(got, ref_whole, scores, kept)


def test_tiled_kernel_path_with_ties_matches_whole(monkeypatch):
    """All-equal scores (q = 0): tiles pick the same K lowest indices as the whole-tensor select; over the budget
    the op goes through the tiles, never the whole-tensor block_scores."""
    q = torch.zeros(2, 1, 1203, 8, device=DEVICE)
    k = torch.randn(2, 1, 1203, 8, device=DEVICE)
    whole = kernels.sla_block_map(q, k, topk=0.05, block_q=23, block_k=6)
    monkeypatch.setattr(block_map, "_SCORE_BUDGET", 4 * 208 * 37)  # ld 208 for 201 key blocks: 37 rows a tile
    assert block_map.score_tile(2, 53, 201) == (1, 37)
    monkeypatch.setattr(block_map, "block_scores", None)  # the size rule must not build the whole score tensor
    tiled = kernels.sla_block_map(q, k, topk=0.05, block_q=23, block_k=6)
    assert torch.equal(tiled, whole)


def test_score_tile_stays_within_budget_at_any_size():
    """The tile rule: whole map when it fits; else at most _SCORE_BUDGET bytes of scores per tile (>= 1 row), for
    1024 VGGT views (22k key blocks, 16 heads) and for rows longer than the budget itself."""
    budget = block_map._SCORE_BUDGET
    assert block_map.score_tile(16, 687, 687) == (16, 687)  # 32 views: 30 MB, scored whole
    for bh, n_q, n_k in [(16, 2748, 2748), (16, 21984, 21984), (32, 10**6, 10**6), (1, 3, 5 * 10**6)]:
        heads, rows = block_map.score_tile(bh, n_q, n_k)
        assert 1 <= heads <= bh and 1 <= rows <= n_q and (heads == 1 or rows == n_q)
        assert heads * rows * 4 * block_map._score_ld(n_k) <= budget
        assert (heads + 1) * rows * 4 * block_map._score_ld(n_k) > budget or heads == bh  # as large as fits
    assert block_map.score_tile(1, 3, 40 * 10**6) == (1, 1)  # one row over the budget: a row at a time
    assert lite3r._score_tile(16, 21984, 21984)[1] * 4 * 21984 <= lite3r._SCORE_BUDGET


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_tiled_block_map_peak_allocation_is_bounded(monkeypatch, path):
    """No tensor larger than the score budget (plus the pooled inputs) is created, while the whole score tensor would
    be 16x that: every op's output is recorded while the map runs (kernels: tiled_block_map's host code, which the
    size rule sends every over-budget map to; selection by a torch.topk twin of select_top, which the interpreter
    runs fast: the select kernel allocates only its LUT)."""
    gen = torch.Generator().manual_seed(5)
    N, D, bs = 2001, 8, 4
    q, k = (torch.randn(1, 2, N, D, generator=gen).to(DEVICE) for _ in range(2))
    n = -(-N // bs)
    whole_bytes = 2 * n * n * 4
    monkeypatch.setattr(block_map, "_SCORE_BUDGET", whole_bytes // 16)
    monkeypatch.setattr(lite3r, "_SCORE_BUDGET", whole_bytes // 16)
    monkeypatch.setattr(block_map, "select_top",
                        lambda s, kept: s.topk(kept, dim=-1, sorted=False).indices.to(torch.int32))
    inputs_bytes = 2 * n * bs * D * 4  # pooling pads (or centres) q / k once
    with LargestAllocation() as mode:
        if path == "kernels":
            lut = block_map.tiled_block_map(q, k, 25, bs, bs)
        else:
            lut = lite3r._block_map(q, k, 24.5 / n, bs, bs)  # K = 25 exactly
    assert lut.shape == (1, 2, n, 25)
    assert mode.largest <= max(whole_bytes // 16, inputs_bytes) < whole_bytes // 4


def test_pool_totals_are_the_token_sums():
    """The centring's sum of k over all N tokens, from per-program partial sums (several programs per head: 8 blocks
    each), equals torch's; the block means too."""
    gen = torch.Generator().manual_seed(9)
    k = torch.randn(2, 3, 1001, 16, generator=gen).to(DEVICE)
    means, total = block_map._block_means(k, 7, totals=True)  # 143 blocks: 18 programs per head
    assert total.shape == (6, 16) and means.shape == (6, 143, 16)
    assert torch.allclose(total.cpu(), k.double().sum(dim=2).flatten(0, 1).float().cpu(), rtol=1e-5, atol=1e-4)
    assert torch.allclose(means.cpu(), lite3r._block_mean(k.cpu(), 7).flatten(0, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("views", [32, 128])
def test_tiled_block_map_equals_whole_gpu(monkeypatch, views):
    """VGGT-1B's global attention at 32 / 128 views (16 heads, Mk = 687 / 2748): the tiled map (default budget, and
    8 MiB tiles: many boundaries) equals the whole-tensor one, which is the same from run to run (the centring's sum
    is deterministic)."""
    from lite3r_kernels.sla import block_scores, num_kept, select_top

    gen = torch.Generator().manual_seed(views)
    N, bs = views * 1374, 64
    q, k = (torch.randn(1, 16, N, 64, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    kept = num_kept(0.05, -(-N // bs))
    whole = select_top(block_scores(q, k, bs, bs), kept).sort(dim=-1).values
    assert torch.equal(select_top(block_scores(q, k, bs, bs), kept).sort(dim=-1).values, whole)
    assert torch.equal(block_map.tiled_block_map(q, k, kept, bs, bs).sort(dim=-1).values, whole)
    assert torch.equal(kernels.sla_block_map(q, k, topk=0.05).sort(dim=-1).values, whole)
    monkeypatch.setattr(block_map, "_SCORE_BUDGET", 8 << 20)
    assert torch.equal(block_map.tiled_block_map(q, k, kept, bs, bs).sort(dim=-1).values, whole)


@pytest.mark.gpu
@pytest.mark.parametrize("dist", ["normal", "ties"])
def test_select_top_past_16384_key_blocks_gpu(dist):
    """Rows of 21984 key blocks (VGGT-1B at 1024 views, 64-token blocks) - past the select kernel's 16384-key tile,
    where torch.topk used to take over - selected exactly by the chunked kernel: a stable sort's top K (ties to
    the lowest index), ascending, at a kept fraction (K = 1100) and a count (K = 64)."""
    from lite3r_kernels.sla import select_top

    assert block_map._select_launch(21984)[-1]  # the chunked path
    gen = torch.Generator().manual_seed(21984)
    s = torch.randn(512, 21984, generator=gen)
    if dist == "ties":
        s = s.mul(2).round()
    for kept in (1100, 64):
        want = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :kept].sort(dim=1).values.to(torch.int32)
        assert torch.equal(select_top(s.to(DEVICE), kept).cpu(), want)


@pytest.mark.gpu
def test_block_map_at_1024_views_gpu():
    """The op at VGGT-1B's 1024-view global attention (N = 1,406,976 tokens, 16 heads, Mk = 21984, K = 64): tiled
    scores + chunked select. Every kept set is top K up to fp32 rounding against fp64 scores, and equal to the exact
    one where the K-th and (K+1)-th scores are separated (checked on 3 heads x 64 query blocks)."""
    gen = torch.Generator(DEVICE).manual_seed(1024)
    N, bs, kept = 1024 * 1374, 64, 64
    q, k = (torch.randn(1, 16, N, 64, generator=gen, device=DEVICE).to(torch.bfloat16) for _ in range(2))
    lut = kernels.sla_block_map(q, k, topk=lite3r._kept_fraction(kept, 21984))
    assert lut.shape == (1, 16, 21984, kept)
    heads, rows = [0, 7, 15], torch.randint(0, 21984, (64,), generator=gen, device=DEVICE)
    qd = lite3r._block_mean(q[:, heads].double(), bs)[:, :, rows]
    kd = k[:, heads].double()
    scores = (qd @ lite3r._block_mean(kd - kd.mean(dim=2, keepdim=True), bs).transpose(-1, -2)).cpu()
    want = scores.topk(kept, dim=-1).indices.to(torch.int32)
    check_selection(lut[:, heads][:, :, rows], want, scores, kept)
