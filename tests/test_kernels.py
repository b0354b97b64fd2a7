"""kernels/sla/ (lite3r_kernels.sla) against lite3r's PyTorch references: block map, forward (o_s, o_l) and all
three gradients.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay small.
Attention kernels and the reference get the SAME lut (a block map computed twice may flip near-ties); the block map
kernel is tested on its own. Gradients use a non-unit upstream gradient for both branches.
"""
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lite3r

kernels = pytest.importorskip("lite3r_kernels")
if not kernels.AVAILABLE:
    pytest.skip("triton is not installed", allow_module_level=True)

from lite3r_kernels.sla import num_kept, transpose_lut  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = settings(max_examples=int(os.environ.get("LITE3R_KERNEL_EXAMPLES", "6")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """rms(a - b) / max(rms(b), 0.05), in fp64 (b is the reference; values here are O(1), the floor keeps a
    near-zero reference, e.g. dq when a query sees a single key, from turning rounding noise into a big ratio)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(0.05))


def random_lut(B: int, H: int, n_q: int, n_k: int, kept: int, gen: torch.Generator) -> torch.Tensor:
    """[B, H, Mq, K] int32 of distinct key-block indices per query block, in random order."""
    return torch.rand(B, H, n_q, n_k, generator=gen).argsort(dim=-1)[..., :kept].to(torch.int32)


def stable_top_k(s: torch.Tensor, kk: int) -> torch.Tensor:
    """int32 [rows, kk]: the indices of the kk largest of each row, ties to the lowest index, ascending."""
    return torch.sort(s, dim=1, descending=True, stable=True).indices[:, :kk].sort(dim=1).values.to(torch.int32)


def qkv(B, H, N, D, dtype, gen, scale=1.0):
    return [(torch.randn(B, H, N, D, generator=gen) * scale).to(DEVICE, dtype).requires_grad_() for _ in range(3)]


def branches_and_grads(fn, q, k, v, g_s, g_l):
    o_s, o_l = fn(q, k, v)
    grads = torch.autograd.grad((o_s.float() * g_s).sum() + (o_l.float() * g_l).sum(), (q, k, v))
    return [o_s, o_l, *grads]


def compare(q, k, v, lut, block_q, block_k, feature_map, gen):
    """Kernel vs reference for (o_s, o_l, dq, dk, dv) at q's dtype; returns the list of relative rms errors and the
    errors of the PyTorch reference run at the same dtype (both against the fp32 reference)."""
    g_s = torch.randn(q.shape, generator=gen).to(DEVICE)
    g_l = torch.randn(q.shape, generator=gen).to(DEVICE)

    def kern(a, b, c):
        return kernels.sla_branches(a, b, c, topk=1.0, block_q=block_q, block_k=block_k, feature_map=feature_map,
                                    lut=lut)

    def ref(a, b, c):
        return lite3r.sla_reference(a, b, c, lut, block_q=block_q, block_k=block_k, feature_map=feature_map)

    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    exact = branches_and_grads(ref, q32, k32, v32, g_s, g_l)
    got = branches_and_grads(kern, q, k, v, g_s, g_l)
    same_dtype = branches_and_grads(ref, q, k, v, g_s, g_l)
    for t, e in zip(got, exact):
        assert t.shape == e.shape and t.dtype == q.dtype
        assert torch.isfinite(t).all()
    return [rel_rms(t, e) for t, e in zip(got, exact)], [rel_rms(t, e) for t, e in zip(same_dtype, exact)]


NAMES = ["o_s", "o_l", "dq", "dk", "dv"]


@FAST
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 150), D=st.sampled_from([16, 32, 64]),
       block_q=st.sampled_from([16, 32]), block_k=st.sampled_from([16, 32]), frac=st.floats(0.0, 1.0),
       feature_map=st.sampled_from(["softmax", "elu", "relu"]), seed=st.integers(0, 2**16))
def test_sla_matches_reference_fp32(B, H, N, D, block_q, block_k, frac, feature_map, seed):
    gen = torch.Generator().manual_seed(seed)
    n_q, n_k = -(-N // block_q), -(-N // block_k)
    kept = max(1, round(frac * n_k))  # from one key block to all of them
    lut = random_lut(B, H, n_q, n_k, kept, gen).to(DEVICE)
    q, k, v = qkv(B, H, N, D, torch.float32, gen)
    errs, _ = compare(q, k, v, lut, block_q, block_k, feature_map, gen)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3  # GPU tl.dot runs fp32 as tf32
    assert max(errs) < tol, dict(zip(NAMES, errs))


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("step", [1, 2], ids=lambda s: f"step{s}")
@pytest.mark.parametrize("N,D,block_q,kept", [(64, 32, 16, 3), (64, 32, 32, 4), (61, 32, 16, 3), (64, 24, 16, 4)],
                         ids=["even-odd-k", "even", "ragged-n", "d24"])
def test_sla_fwd_every_step_and_even_path(monkeypatch, tma, step, N, D, block_q, kept):
    """Every forward code path: STEP kept key blocks per online-softmax step plus the KK % STEP remaining slots one
    at a time (K = 3 at STEP = 2), the unmasked EVEN path (blocks and D powers of two, N a multiple of the blocks)
    with TMA descriptors or pointer loads, and the masked one (N = 61, D = 24; never TMA). The interpreter runs one
    autotune config: swap it."""
    import triton

    from lite3r_kernels.sla import attention

    monkeypatch.setattr(attention._sla_fwd_kernel, "configs",
                        [triton.Config({"STEP": step}, num_warps=4, num_stages=1)])
    monkeypatch.setattr(attention, "USE_TMA", tma)
    used = []
    real = attention._tma_descriptors
    monkeypatch.setattr(attention, "_tma_descriptors", lambda *a: used.append(real(*a)) or used[-1])
    gen = torch.Generator().manual_seed(N + D + kept)
    block_k = 16
    lut = random_lut(1, 2, -(-N // block_q), -(-N // block_k), kept, gen).to(DEVICE)
    q, k, v = qkv(1, 2, N, D, torch.float32, gen)
    errs, _ = compare(q, k, v, lut, block_q, block_k, "softmax", gen)
    assert max(errs) < (1e-5 if DEVICE == "cpu" else 5e-3), dict(zip(NAMES, errs))
    even = N % 32 == 0 and D == 32
    assert [d is not None for d in used] == ([tma] if even else []), "TMA taken where it should not be, or not"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N,D,block", [(97, 64, 32), (64, 32, 64), (40, 16, 16)], ids=["odd97", "one-block", "d16"])
def test_sla_low_precision_within_twice_torch_error(dtype, N, D, block):
    """bf16/fp16: the kernel's error against the fp32 reference is at most ~2x that of the PyTorch reference run
    at the same dtype (floor: a few ulps of the dtype, since the reference upcasts internally)."""
    gen = torch.Generator().manual_seed(N + D)
    n = -(-N // block)
    lut = random_lut(2, 2, n, n, max(1, n // 2), gen).to(DEVICE)
    q, k, v = qkv(2, 2, N, D, dtype, gen)
    errs, torch_errs = compare(q, k, v, lut, block, block, "softmax", gen)
    floor = 2.0 ** -(8 if dtype == torch.bfloat16 else 11) * 2
    for name, e, te in zip(NAMES, errs, torch_errs):
        assert e <= 2 * te + floor, f"{name}: kernel {e:.2e} vs torch {te:.2e} at {dtype}"


def test_sla_all_blocks_is_dense_attention():
    """topk=1.0 through the public entry point (block map included) is exact softmax attention."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = qkv(1, 2, 77, 32, torch.float32, gen)
    o_s, o_l = kernels.sla_branches(q, k, v, topk=1.0, block_q=32, block_k=16)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert rel_rms(o_s, dense) < 1e-5
    assert rel_rms(o_l, lite3r.linear_attention_reference(q, k, v)) < 1e-5


def test_sla_strided_inputs_and_zero_block():
    """q, k, v as views of a packed qkv projection (the backbones' layout) and an all-zero key block."""
    gen = torch.Generator().manual_seed(5)
    B, N, H, D = 1, 50, 2, 16
    qkv_ = torch.randn(B, N, 3, H, D, generator=gen).to(DEVICE)
    qkv_[:, 16:32, 1] = 0.0  # key block 1 all zero
    q, k, v = qkv_.permute(2, 0, 3, 1, 4)  # [B, H, N, D] non-contiguous views
    lut = random_lut(B, H, 4, 4, 2, gen).to(DEVICE)
    lut[..., 0] = 1
    lut[..., 1] = torch.where(lut[..., 1] == 1, 2, lut[..., 1])  # distinct, keeps the zero block
    got = kernels.sla_branches(q, k, v, topk=1.0, block_q=16, block_k=16, lut=lut)
    want = lite3r.sla_reference(q, k, v, lut, block_q=16, block_k=16)
    for a, b in zip(got, want):
        assert rel_rms(a, b) < 1e-5


def test_sla_fwd_contiguous_keys_past_int32_offsets(monkeypatch):
    """The forward kernel's key offsets inside a head are int32: strided k, v past the limit are copied contiguous
    first, and a head too long even then is refused (limit lowered so a small packed-qkv input crosses it)."""
    from lite3r_kernels.sla import attention

    gen = torch.Generator().manual_seed(6)
    B, N, H, D = 1, 50, 2, 16
    q, k, v = torch.randn(B, N, 3, H, D, generator=gen).to(DEVICE).permute(2, 0, 3, 1, 4)  # k.stride(2) = 96
    lut = random_lut(B, H, 4, 4, 3, gen).to(DEVICE)
    want = lite3r.sla_reference(q, k, v, lut, block_q=16, block_k=16)
    monkeypatch.setattr(attention, "_FWD_MAX_OFFSET", (N + 16) * D + 1)  # strided offsets cross it, contiguous ones not
    got = kernels.sla_branches(q, k, v, topk=1.0, block_q=16, block_k=16, lut=lut)
    for a, b in zip(got, want):
        assert rel_rms(a, b) < 1e-5
    monkeypatch.setattr(attention, "_FWD_MAX_OFFSET", (N + 16) * D)
    with pytest.raises(ValueError, match="32-bit"):
        kernels.sla_branches(q, k, v, topk=1.0, block_q=16, block_k=16, lut=lut)


@FAST
@given(N=st.integers(1, 200), D=st.sampled_from([16, 32, 64]), block_q=st.sampled_from([16, 32, 64]),
       block_k=st.sampled_from([16, 32, 64]), topk=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_block_map_keeps_top_scores(N, D, block_q, block_k, topk, seed):
    """Same shape and K as lite3r.sla_block_map; distinct indices; the kept blocks' scores (fp64 recomputation of
    the definition) are the top K up to fp32 rounding, and the selection equals lite3r's when scores are
    separated."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, N, D, generator=gen).to(DEVICE)
    k = torch.randn(2, 2, N, D, generator=gen).to(DEVICE)
    lut = kernels.sla_block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    ref = lite3r.sla_block_map(q, k, topk=topk, block_q=block_q, block_k=block_k)
    n_k = -(-N // block_k)
    assert lut.dtype == torch.int32 and lut.shape == ref.shape
    assert lut.shape[-1] == num_kept(topk, n_k)
    srt = lut.sort(dim=-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all() and lut.min() >= 0 and lut.max() < n_k
    qd, kd = q.double(), k.double()
    pq = lite3r._block_mean(qd, block_q)
    pk = lite3r._block_mean(kd - kd.mean(dim=2, keepdim=True), block_k)
    scores = pq @ pk.transpose(-1, -2)  # [B, H, Mq, Mk]
    kth = scores.topk(lut.shape[-1], dim=-1).values[..., -1:]
    got = scores.gather(-1, lut.long())
    assert (got >= kth - 1e-4 * scores.abs().amax(-1, keepdim=True)).all()
    top2 = scores.sort(dim=-1, descending=True).values
    gap = (top2[..., lut.shape[-1] - 1] - top2[..., lut.shape[-1]]) if lut.shape[-1] < n_k else None
    if gap is None or bool((gap > 1e-3).all()):
        assert torch.equal(srt, ref.sort(dim=-1).values)


@FAST
@given(rows=st.integers(1, 5), MK=st.integers(1, 150), frac=st.floats(0.0, 1.0),
       dist=st.sampled_from(["normal", "lognormal", "heavy", "bimodal", "ties", "constant"]),
       guesses=st.sampled_from([0, 10]), fused_stats=st.booleans(), chunked=st.booleans(),
       long_row=st.sampled_from([0, 16, 32]), seed=st.integers(0, 2**16))
def test_select_kernel_is_exact_top_k(rows, MK, frac, dist, guesses, fused_stats, chunked, long_row, seed):
    """_select_kernel alone, launched as select_top launches it: the KK largest of each row, ties to the lowest
    index, written ascending, on rows whose shape defeats the guessed probes (skewed, heavy-tailed, two clusters,
    many ties, all equal) and with bisection only; both reductions of the row statistics; indices written from the
    tile in registers or chunk by chunk (one key per thread per chunk: rows over 128 keys span two chunks); with
    `long_row`, rows longer than the tile (CHUNKED: statistics and counts over 16- or 32-key chunks, as rows past
    _SELECT_MAX_TILE run)."""
    from lite3r_kernels.sla import _normal_quantile, _select_kernel, _select_launch

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, MK, generator=gen)
    s = {"normal": x, "lognormal": x.exp(), "heavy": x / torch.rand(rows, MK, generator=gen).clamp_min(1e-3),
         "bimodal": x + 50.0 * (torch.rand(rows, MK, generator=gen) < 0.5), "ties": x.mul(2).round() + 0.5,
         "constant": torch.full((rows, MK), 3.0)}[dist]
    kk = max(1, min(MK, round(frac * MK)))
    z, density = _normal_quantile(kk, MK)
    lut = torch.full((rows, kk), -1, dtype=torch.int32)
    s, lut = s.to(DEVICE), lut.to(DEVICE)
    tile, warps, _, _, _ = _select_launch(MK)
    final = 32 * warps if chunked else 0
    if long_row:  # the tile is one chunk of the row; the indices are then always written chunk by chunk
        tile, final = long_row, long_row
    _select_kernel[(rows,)](s, lut, MK, MK, kk, Z=z, DENSITY=density, GUESSES=guesses, TILE_MK=tile,
                            FUSED_STATS=fused_stats, FINAL_CHUNK=final, CHUNKED=bool(long_row), num_warps=warps)
    assert torch.equal(lut.cpu(), stable_top_k(s.cpu(), kk))


@pytest.mark.parametrize("MK", [16, 128, 687, 1024])
def test_select_top_power_of_two_and_vggt_rows(MK):
    """select_top on 64 rows of normal scores whose length fills the tile exactly (16, 128, 1024) or not (687: VGGT
    at 32 views): equal to a stable sort's top K (a 16-wide row once came out wrong on the GPU)."""
    from lite3r_kernels.sla import select_top

    gen = torch.Generator().manual_seed(MK)
    s = torch.randn(64, MK, generator=gen)
    kk = num_kept(0.05, MK) if MK > 16 else 2
    assert torch.equal(select_top(s.to(DEVICE), kk).cpu(), stable_top_k(s, kk))


def test_block_map_selects_planted_blocks():
    """Keys of block j aligned with the queries of block i -> block i keeps exactly j (plus nothing else at K=1)."""
    D, bs, m = 16, 16, 5
    q = torch.zeros(1, 1, m * bs, D)
    k = torch.zeros(1, 1, m * bs, D)
    perm = [3, 0, 4, 1, 2]
    for i in range(m):
        q[0, 0, i * bs:(i + 1) * bs, i] = 1.0
        k[0, 0, perm[i] * bs:(perm[i] + 1) * bs, i] = 1.0
    lut = kernels.sla_block_map(q.to(DEVICE), k.to(DEVICE), topk=0.2, block_q=bs, block_k=bs)
    assert lut.flatten().tolist() == perm


def test_transpose_lut_is_csr_of_selection():
    gen = torch.Generator().manual_seed(0)
    lut = random_lut(2, 3, 7, 5, 2, gen)
    offsets, counts, qidx = transpose_lut(lut, 5)
    for bh in range(6):
        for j in range(5):
            s, c = int(offsets[bh * 5 + j]), int(counts[bh * 5 + j])
            want = sorted(i for i in range(7) if j in lut.view(6, 7, 2)[bh, i].tolist())
            assert sorted(qidx[s:s + c].tolist()) == want


def test_sla_rejects_bad_input():
    q = torch.randn(1, 1, 32, 16, device=DEVICE)
    with pytest.raises(ValueError, match="feature_map"):
        kernels.sla_branches(q, q, q, topk=0.5, block_q=16, block_k=16, feature_map="cosine")
    with pytest.raises(ValueError, match="lut has shape"):
        kernels.sla_branches(q, q, q, topk=0.5, block_q=16, block_k=16, lut=torch.zeros(1, 1, 3, 1).int())
    with pytest.raises(ValueError, match="topk"):
        kernels.sla_block_map(q, q, topk=0.0, block_q=16, block_k=16)
    with pytest.raises(ValueError, match=r"\[B, H, N, D\]"):
        kernels.sla_branches(q, q[0], q, topk=0.5)


def test_lite3r_dispatches_to_kernels(monkeypatch):
    """LITE3R_BACKEND=triton runs sla_attention through the kernels and matches LITE3R_BACKEND=torch."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(1, 2, 70, 32, torch.float32, gen)
    proj_l = torch.nn.Linear(32, 32).to(DEVICE)
    outs = []
    for backend in ("triton", "torch"):
        monkeypatch.setenv("LITE3R_BACKEND", backend)
        o = lite3r.sla_attention(q, k, v, topk=1.0, block_q=32, block_k=32, proj_l=proj_l)
        outs.append([o, *torch.autograd.grad(o.square().sum(), (q, k, v))])
    for a, b in zip(*outs):
        assert rel_rms(a, b) < 1e-5


@FAST
@given(N=st.integers(20, 150), D=st.sampled_from([16, 32]), block=st.sampled_from([16, 32]),
       topk=st.sampled_from([0.3, 0.6, 1.0]), feature_map=st.sampled_from(["softmax", "elu", "relu"]),
       bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_sla_output_is_o_s_plus_proj_l(N, D, block, topk, feature_map, bias, dtype, seed):
    """sla_output (inference: proj_l folded into the linear state, one buffer) == o_s + proj_l(o_l) of sla_branches
    on the same block map, to the dtype's rounding of the output."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (t.detach() for t in qkv(1, 2, N, D, dtype, gen))
    proj_l = torch.nn.Linear(D, D, bias=bias).to(DEVICE)
    with torch.no_grad():
        proj_l.weight.copy_(torch.randn(D, D, generator=gen) * 0.3)
        lut = kernels.sla_block_map(q, k, topk=topk, block_q=block, block_k=block)
        o_s, o_l = kernels.sla_branches(q, k, v, topk=topk, block_q=block, block_k=block, feature_map=feature_map,
                                        lut=lut)
        want = o_s.float() + proj_l(o_l.float())
        got = kernels.sla_output(q, k, v, topk=topk, block_q=block, block_k=block, feature_map=feature_map,
                                 weight=proj_l.weight, bias=proj_l.bias, lut=lut)
    assert got.dtype == dtype and got.shape == q.shape
    assert rel_rms(got, want) < (2e-5 if dtype == torch.float32 else 8e-3)


def test_lite3r_inference_takes_the_one_buffer_path(monkeypatch):
    """sla_attention with nothing to differentiate runs sla_output; with a proj_l that trains, sla_branches (the
    differentiable path); both give o_s + proj_l(o_l)."""
    monkeypatch.setenv("LITE3R_BACKEND", "triton")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (t.detach() for t in qkv(1, 2, 70, 32, torch.float32, gen))
    proj_l = torch.nn.Linear(32, 32).to(DEVICE)
    calls = []
    real = kernels.sla_output
    monkeypatch.setattr(kernels, "sla_output", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    with torch.no_grad():
        o_s, o_l = kernels.sla_branches(q, k, v, topk=0.5, block_q=32, block_k=32, feature_map="softmax")
        want = o_s + proj_l(o_l)
        got = lite3r.sla_attention(q, k, v, topk=0.5, block_q=32, block_k=32, proj_l=proj_l)
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():
        got = lite3r.sla_attention(q, k, v, topk=0.5, block_q=32, block_k=32, proj_l=proj_l)
    assert calls == [1] and got.requires_grad  # not the inference path
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_opcheck_sla_ops():
    """torch.library.opcheck on the registered ops (schema + autograd registration everywhere; fake-tensor and
    AOT dispatch need a real device, the interpreter cannot run on fake tensors)."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    lut = random_lut(1, 2, 3, 3, 2, gen).to(DEVICE)
    kv, ksum = kernels.sla.linear_state(k.detach(), v.detach(), "softmax")
    utils = None if DEVICE == "cuda" else ("test_schema", "test_autograd_registration")
    kw = {} if utils is None else {"test_utils": utils}
    torch.library.opcheck(torch.ops.lite3r.sla_fwd.default,
                          (q, k, v, lut, kv.requires_grad_(), ksum.requires_grad_(), 16, 16, 0), **kw)
    # inference only (no autograd formula: lite3r.sla_attention takes it when nothing needs grad)
    torch.library.opcheck(torch.ops.lite3r.sla_fwd_sum.default,
                          (q.detach(), k.detach(), v.detach(), lut, kv.detach(), ksum.detach(), 16, 16, 0), **kw)
    torch.library.opcheck(torch.ops.lite3r.sla_block_map.default, (q.detach(), k.detach(), 0.5, 16, 16), **kw)
    torch.library.opcheck(torch.ops.lite3r.sla_linear_state.default, (k, v, 1), **kw)
    torch.library.opcheck(torch.ops.lite3r.sla_linear_state_bwd.default,
                          (k.detach(), v.detach(), torch.randn_like(kv), torch.randn_like(ksum), 2), **kw)


def test_imports_without_triton():
    """kernels imports with triton missing: AVAILABLE is False, supports() is False, entry points raise."""
    code = ("import sys; sys.modules['triton'] = None; import torch, kernels; assert not kernels.AVAILABLE; "
            "assert not kernels.supports(torch.zeros(1)); "
            "exec('try:\\n kernels.sla_branches()\\nexcept RuntimeError as e:\\n print(e)')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(),
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    assert out.returncode == 0, out.stderr
    assert "triton" in out.stdout


# --------------------------------------------------------------------------------------------- GPU, real size
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sla_real_size_gpu(dtype):
    """N = 32 x 1374 (VGGT at 32 views), D = 64, topk = 0.05: forward and gradients vs the reference."""
    gen = torch.Generator().manual_seed(0)
    N, D, bs = 32 * 1374, 64, 64
    q, k, v = qkv(1, 2, N, D, dtype, gen)
    lut = kernels.sla_block_map(q, k, topk=0.05, block_q=bs, block_k=bs)
    errs, torch_errs = compare(q, k, v, lut, bs, bs, "softmax", gen)
    floor = 2.0 ** -(8 if dtype == torch.bfloat16 else 11) * 2
    for name, e, te in zip(NAMES, errs, torch_errs):
        assert e <= 2 * te + floor, f"{name}: kernel {e:.2e} vs torch {te:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("views", [32, 128])
def test_block_map_real_size_gpu(views):
    """N = views x 1374, 64-token blocks (Mk = 687 / 2748 key blocks), topk = 0.05: the select kernel's kept blocks
    are the top K of the fp64 scores up to fp32 rounding, and equal torch.topk's on the kernel's own scores."""
    from lite3r_kernels.sla import block_scores, select_top

    gen = torch.Generator().manual_seed(views)
    N, D, bs = views * 1374, 64, 64
    q, k = (torch.randn(1, 2, N, D, generator=gen).to(DEVICE, torch.bfloat16) for _ in range(2))
    lut = kernels.sla_block_map(q, k, topk=0.05, block_q=bs, block_k=bs)
    kept = num_kept(0.05, -(-N // bs))
    assert lut.shape == (1, 2, -(-N // bs), kept)
    qd, kd = q.double(), k.double()
    exact = lite3r._block_mean(qd, bs) @ lite3r._block_mean(kd - kd.mean(dim=2, keepdim=True), bs).transpose(-1, -2)
    kth = exact.topk(kept, dim=-1).values[..., -1:]
    assert (exact.gather(-1, lut.long()) >= kth - 1e-5 * exact.abs().amax(-1, keepdim=True)).all()
    scores = block_scores(q, k, bs, bs)
    want = scores.topk(kept, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    assert torch.equal(select_top(scores, kept), want)


@pytest.mark.gpu
@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_sla_linear_branch_beyond_fp16_range_gpu(feature_map):
    """The forward's linear branch multiplies fp16 operands scaled into [-1, 1]: with q of magnitude ~100 (elu/relu
    features ~100) and v ~3e4 (kv ~1e8, past fp16's 65504), o_l stays finite and as close to the fp32 reference as
    the bf16 reference is (without the scaling it would be inf)."""
    gen = torch.Generator().manual_seed(5)
    N, D, bs = 4096, 64, 64
    q, k, v = (t.detach() for t in qkv(1, 2, N, D, torch.bfloat16, gen))
    q, v = q * 100.0, v * 3e4
    lut = kernels.sla_block_map(q, k, topk=0.05, block_q=bs, block_k=bs)
    o_l = kernels.sla_branches(q, k, v, topk=0.05, lut=lut, feature_map=feature_map)[1]
    ref = lambda *t: lite3r.sla_reference(*t, lut, block_q=bs, block_k=bs, feature_map=feature_map)[1]  # noqa: E731
    exact, same_dtype = ref(q.float(), k.float(), v.float()), ref(q, k, v)
    assert torch.isfinite(o_l).all()
    assert rel_rms(o_l, exact) <= 2 * rel_rms(same_dtype, exact) + 2.0 ** -7


@pytest.mark.gpu
def test_sla_fwd_tma_equals_pointer_loads_gpu(monkeypatch):
    """N = 32 x 1374 in bf16 with qkv-strided inputs: the forward through TMA descriptors equals the pointer-load
    forward (same blocks, same fp32 accumulation; only the summation order of the two blocks of a step differs)."""
    from lite3r_kernels.sla import attention

    gen = torch.Generator().manual_seed(3)
    N, H, D, bs = 32 * 1374, 4, 64, 64
    qkv_ = torch.randn(1, N, 3, H, D, generator=gen).to(DEVICE, torch.bfloat16)
    q, k, v = (qkv_[:, :, i].transpose(1, 2) for i in range(3))
    lut = kernels.sla_block_map(q, k, topk=0.05, block_q=bs, block_k=bs)
    assert attention._tma_descriptors(k, v, bs) is not None
    with_tma = kernels.sla_branches(q, k, v, topk=0.05, lut=lut)
    monkeypatch.setattr(attention, "USE_TMA", False)
    assert attention._tma_descriptors(k, v, bs) is None
    without = kernels.sla_branches(q, k, v, topk=0.05, lut=lut)
    assert rel_rms(with_tma[0], without[0]) < 2e-3 and rel_rms(with_tma[1], without[1]) < 1e-5


@pytest.mark.gpu
def test_sla_linear_state_beside_block_map_gpu(monkeypatch):
    """The linear state on the side stream (eager CUDA) gives the outputs and gradients of the one-stream path (up to
    the order of the fp32 atomic adds of kv and of k's total, which differs from run to run on either path)."""
    from lite3r_kernels.sla import attention

    gen = torch.Generator().manual_seed(4)
    q, k, v = qkv(1, 4, 32 * 1374, 64, torch.bfloat16, gen)
    outs = []
    for overlap in (True, False):
        monkeypatch.setattr(attention, "OVERLAP", overlap)
        assert (attention._side_stream(k) is not None) == overlap  # the switch is read where it lives
        o_s, o_l = kernels.sla_branches(q, k, v, topk=0.05)
        outs.append([o_s, o_l, *torch.autograd.grad((o_s.float().sum() + o_l.float().square().sum()), (q, k, v))])
    for name, a, b in zip(NAMES, *outs):
        assert rel_rms(a, b) < 1e-3, name


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1000, 1024], ids=["ragged", "even"])
def test_sla_compile_fullgraph_gpu(N):
    """torch.compile(fullgraph=True) of an SLA attention block (qkv -> SLA kernels -> proj_l, proj) forward and
    backward, equal to eager; N = 1024 takes the EVEN path (TMA in eager, pointer loads in the compiled graph)."""
    torch.manual_seed(0)
    C, H = 256, 4
    qkv_l, proj, proj_l = torch.nn.Linear(C, 3 * C), torch.nn.Linear(C, C), torch.nn.Linear(C // H, C // H)
    mods = torch.nn.ModuleList([qkv_l, proj, proj_l]).cuda().bfloat16()

    def block(x):
        B, N, _ = x.shape
        q, k, v = qkv_l(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        o_s, o_l = kernels.sla_branches(q, k, v, topk=0.1, block_q=64, block_k=64)
        return proj((o_s + proj_l(o_l)).transpose(1, 2).reshape(B, N, C))

    x = torch.randn(2, N, C, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    eager = block(x)
    (g_eager,) = torch.autograd.grad(eager.float().square().sum(), x)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    (g_comp,) = torch.autograd.grad(out.float().square().sum(), x)
    assert rel_rms(out, eager) < 1e-2 and rel_rms(g_comp, g_eager) < 2e-2
    del mods


@pytest.fixture
def small_linear_chunk(monkeypatch):
    """Linear-state chunks of 64 tokens (the tile), forward and backward, so that small N spans several chunks and
    their atomics."""
    from lite3r_kernels.sla import attention, linear

    monkeypatch.setattr(attention, "_LINEAR_CHUNK", linear._LINEAR_TILE)
    monkeypatch.setattr(linear, "_LINEAR_STATE_CHUNK", linear._LINEAR_TILE)


@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
def test_linear_state_matches_torch_twin(feature_map, small_linear_chunk):
    """The fused phi(k)^T v / sum phi(k) kernel (several chunks, partial last tile) and its backward kernel."""
    from lite3r_kernels.sla import linear_state, linear_state_torch

    gen = torch.Generator().manual_seed(7)
    N = 150
    k, v = (torch.randn(1, 2, N, 24, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    got, want = linear_state(k, v, feature_map), linear_state_torch(k, v, feature_map)
    g = [torch.randn(t.shape, generator=gen).to(DEVICE) for t in want]
    gg = torch.autograd.grad(sum((a * b).sum() for a, b in zip(got, g)), (k, v))
    gw = torch.autograd.grad(sum((a * b).sum() for a, b in zip(want, g)), (k, v))
    tol = 1e-5 if DEVICE == "cpu" else 5e-3
    for a, b in zip([*got, *gg], [*want, *gw]):
        assert rel_rms(a, b) < tol


def test_block_map_all_ties_still_picks_k_distinct():
    """Every score equal (q = 0): the select kernel must still write K distinct in-range indices."""
    q = torch.zeros(1, 2, 300, 16, device=DEVICE)
    k = torch.randn(1, 2, 300, 16, device=DEVICE)
    lut = kernels.sla_block_map(q, k, topk=0.3, block_q=16, block_k=16)
    srt = lut.sort(dim=-1).values
    assert lut.shape == (1, 2, 19, 6) and (srt[..., 1:] > srt[..., :-1]).all() and 0 <= lut.min() and lut.max() < 19


def test_block_map_long_rows_read_in_chunks_agree(monkeypatch):
    """Rows longer than the select kernel's tile (past 16384 key blocks on the GPU) are selected by the same kernel
    counting chunk by chunk: the same LUT, ties and order included, as rows held whole."""
    from lite3r_kernels.sla import block_map

    gen = torch.Generator().manual_seed(11)
    q, k = (torch.randn(1, 2, 200, 16, generator=gen).to(DEVICE) for _ in range(2))
    fused = kernels.sla_block_map(q, k, topk=0.25, block_q=16, block_k=16)
    monkeypatch.setattr(block_map, "_SELECT_MAX_TILE", 4)
    assert block_map._select_launch(13)[-1]  # 13 key blocks: 4 chunks of 4
    chunked = kernels.sla_block_map(q, k, topk=0.25, block_q=16, block_k=16)
    assert torch.equal(fused, chunked)


@pytest.mark.parametrize("feature_map", ["softmax", "elu", "relu"])
@pytest.mark.parametrize("N", [150, 64], ids=["odd150", "one-chunk"])
def test_sla_grads_over_several_linear_chunks(feature_map, N, small_linear_chunk):
    """d kv / d ksum of the SLA backward summed chunk by chunk (_sla_bwd_dstate_kernel): N = 150 is three chunks
    of 64, the last partial."""
    gen = torch.Generator().manual_seed(N)
    n = -(-N // 32)
    lut = random_lut(1, 2, n, n, max(1, n // 2), gen).to(DEVICE)
    q, k, v = qkv(1, 2, N, 32, torch.float32, gen)
    errs, _ = compare(q, k, v, lut, 32, 32, feature_map, gen)
    assert max(errs) < (1e-5 if DEVICE == "cpu" else 5e-3), dict(zip(NAMES, errs))


def test_sla_switches_are_read_where_they_live():
    """USE_TMA / OVERLAP and the launch constants exist once, in the module that reads them at call time; reading
    one from the package raises (a package-level copy would make a flip silently do nothing). The public names and
    the helpers the tests use stay importable from lite3r_kernels.sla."""
    import lite3r_kernels.sla as sla

    assert {"USE_TMA", "OVERLAP"} <= set(sla._LIVES_IN)
    for name, module in sla._LIVES_IN.items():
        with pytest.raises(AttributeError, match=f"lite3r_kernels.sla.{module}"):
            getattr(sla, name)
        assert hasattr(getattr(sla, module), name), (name, module)
    for name in [*sla.__all__, "_normal_quantile", "_select_kernel", "_select_launch", "_sla_fwd_kernel"]:
        assert getattr(sla, name) is not None
    assert kernels.sla_branches is sla.attention.sla_branches and kernels.sla_block_map is sla.block_map.sla_block_map


@pytest.mark.gpu
@pytest.mark.parametrize("views, compiled", [(8, False), (32, False), (8, True)])
def test_sla_output_real_size_gpu(views, compiled):
    """sla_output at VGGT-1B's global-attention shapes (bf16, topk 0.05; TMA in eager at these even shapes, pointer
    loads under torch.compile) == o_s + proj_l(o_l) of sla_branches on the same block map."""
    torch.manual_seed(0)
    N, H, D = views * 1374, 16, 64
    q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    proj_l = torch.nn.Linear(D, D).cuda()
    with torch.no_grad():
        proj_l.weight.normal_(0, 0.1)
        lut = kernels.sla_block_map(q, k, topk=0.05, block_q=64, block_k=64)
        o_s, o_l = kernels.sla_branches(q, k, v, topk=0.05, lut=lut)
        want = o_s.float() + proj_l(o_l.float())
        fn = torch.compile(kernels.sla_output, fullgraph=True) if compiled else kernels.sla_output
        got = fn(q, k, v, topk=0.05, weight=proj_l.weight, bias=proj_l.bias, lut=lut)
    assert rel_rms(got, want) < 8e-3
