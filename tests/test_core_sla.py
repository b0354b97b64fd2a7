"""lite3r.py SLA: block map, reference branches and sla_attention against a naive dense-mask oracle written here
(the N x N mask materialised from the block map), SDPA at topk=1, gradients, and the kernels dispatch guard."""
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lite3r


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    """These tests pin the PyTorch reference: they must not depend on the state of the kernels package."""
    monkeypatch.setenv("LITE3R_BACKEND", "torch")


# ------------------------------------------------------------------------------------------------ naive oracle
def naive_block_scores(q, k, bq, bk):
    """[B, H, Mq, Mk] pooled scores in fp64 by explicit loops over blocks (partial last blocks: real tokens)."""
    B, H, N, D = q.shape
    kc = k.double() - k.double().mean(dim=2, keepdim=True)
    pq = torch.stack([q.double()[:, :, s:s + bq].mean(2) for s in range(0, N, bq)], 2)
    pk = torch.stack([kc[:, :, s:s + bk].mean(2) for s in range(0, N, bk)], 2)
    return torch.einsum("bhid,bhjd->bhij", pq, pk)


def naive_mask(lut, N, bq, bk):
    """[B, H, N, N] bool: query i may see key j iff j's block is in the LUT row of i's block."""
    B, H, n_q, _ = lut.shape
    n_k = -(-N // bk)
    blocks = torch.zeros(B, H, n_q, n_k, dtype=torch.bool)
    blocks.scatter_(-1, lut.long(), True)
    rows = torch.arange(N) // bq
    cols = torch.arange(N) // bk
    return blocks[:, :, rows][:, :, :, cols]


PHI = {"softmax": lambda x: torch.softmax(x, -1), "elu": lambda x: torch.where(x > 0, x + 1, torch.exp(x)),
       "relu": lambda x: x.clamp_min(0)}


def naive_sla(q, k, v, lut, bq, bk, feature_map, W=None, b=None):
    """o_s by a masked dense softmax, o_l by the quadratic form sum_m (phi_q.phi_k_m) v_m / (sum_m phi_q.phi_k_m)."""
    N, D = q.shape[2], q.shape[3]
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * D ** -0.5
    o_s = s.masked_fill(~naive_mask(lut, N, bq, bk), float("-inf")).softmax(-1) @ v
    a = torch.einsum("bhnd,bhmd->bhnm", PHI[feature_map](q), PHI[feature_map](k))
    o_l = (a @ v) / (a.sum(-1, keepdim=True) + lite3r.LINEAR_EPS)
    if W is None:
        return o_s, o_l
    return o_s + o_l @ W.T + b


def _qkv(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _topk_for(kept, n_k):
    """A topk whose K = ceil(topk * Mk) is exactly `kept` (kept / n_k itself can round up past it)."""
    return (kept - 0.5) / n_k


# ------------------------------------------------------------------------------------------------- block map
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 70), D=st.sampled_from([1, 4, 8]),
       bq=st.sampled_from([1, 4, 16, 32]), bk=st.sampled_from([1, 5, 16, 64]), frac=st.floats(0.0, 1.0),
       seed=st.integers(0, 2 ** 16))
def test_block_map_matches_loops(B, H, N, D, bq, bk, frac, seed):
    q, k, _ = _qkv((B, H, N, D), seed=seed)
    n_k = -(-N // bk)
    kept = 1 + round(frac * (n_k - 1))
    lut = lite3r.sla_block_map(q, k, topk=_topk_for(kept, n_k), block_q=bq, block_k=bk)
    assert lut.dtype == torch.int32 and lut.shape == (B, H, -(-N // bq), kept)
    assert bool((lut.sort(-1).values.diff(dim=-1) > 0).all())  # distinct blocks
    # the kept blocks are the top-scoring ones (tie-tolerant: fp32 here vs fp64 in the loops)
    scores = naive_block_scores(q, k, bq, bk)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, lut.long(), True)
    worst_kept = scores.masked_fill(~chosen, float("inf")).amin(-1)
    best_dropped = scores.masked_fill(chosen, float("-inf")).amax(-1)
    assert bool((worst_kept >= best_dropped - 1e-5 * (1 + scores.abs().amax(-1))).all())


def test_block_map_centres_keys_and_counts():
    q, k, _ = _qkv((1, 2, 200, 8), torch.float32)
    lut = lite3r.sla_block_map(q, k, topk=0.05, block_q=16, block_k=16)  # Mk = 13: ceil(0.65) = 1 block
    assert lut.shape == (1, 2, 13, 1)
    assert lite3r.sla_block_map(q, k, topk=0.2, block_q=16, block_k=16).shape[-1] == 3  # ceil(2.6)
    assert lite3r.sla_block_map(q, k, topk=1, block_q=16, block_k=16).shape[-1] == 13
    # a vector shared by all keys shifts all scores of a query block equally: the map ignores it
    shifted = lite3r.sla_block_map(q, k + 50 * torch.randn(8), topk=0.3, block_q=16, block_k=16)
    torch.testing.assert_close(shifted.sort(-1).values, lite3r.sla_block_map(q, k, topk=0.3, block_q=16,
                                                                             block_k=16).sort(-1).values)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="topk"):
            lite3r.sla_block_map(q, k, topk=bad)


# --------------------------------------------------------------------------------------- forward vs oracle
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 70), D=st.sampled_from([2, 4, 8, 16]),
       bq=st.sampled_from([4, 16, 32, 64]), bk=st.sampled_from([4, 8, 16, 64]), frac=st.floats(0.0, 1.0),
       feature_map=st.sampled_from(sorted(lite3r.FEATURE_MAPS)), seed=st.integers(0, 2 ** 16))
def test_sla_matches_dense_mask_oracle(B, H, N, D, bq, bk, frac, feature_map, seed):
    q, k, v = _qkv((B, H, N, D), seed=seed)
    n_k = -(-N // bk)
    topk = _topk_for(1 + round(frac * (n_k - 1)), n_k)
    lut = lite3r.sla_block_map(q, k, topk=topk, block_q=bq, block_k=bk)
    o_s, o_l = lite3r.sla_reference(q, k, v, lut, block_q=bq, block_k=bk, feature_map=feature_map)
    n_s, n_l = naive_sla(q, k, v, lut, bq, bk, feature_map)
    torch.testing.assert_close(o_s, n_s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o_l, n_l, rtol=1e-10, atol=1e-10)
    proj_l = nn.Linear(D, D, dtype=torch.float64)
    o = lite3r.sla_attention(q, k, v, topk=topk, block_q=bq, block_k=bk, feature_map=feature_map, proj_l=proj_l)
    with torch.no_grad():
        ref = naive_sla(q, k, v, lut, bq, bk, feature_map, proj_l.weight, proj_l.bias)
        torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lite3r.sla_attention(q, k, v, topk=topk, block_q=bq, block_k=bk), n_s,
                                   rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)],
                         ids=["fp32", "bf16", "fp16"])
def test_sparse_gather_path_low_precision(dtype, tol):
    """bf16/fp16 in: computed in fp32 and rounded once on the way out (same dtype out)."""
    q, k, v = _qkv((2, 2, 77, 16), dtype, seed=3)
    lut = lite3r.sla_block_map(q, k, topk=0.4, block_q=16, block_k=16)
    o_s, o_l = lite3r.sla_reference(q, k, v, lut, block_q=16, block_k=16)
    assert o_s.dtype == o_l.dtype == dtype
    n_s, n_l = naive_sla(q.double(), k.double(), v.double(), lut, 16, 16, "softmax")
    torch.testing.assert_close(o_s.double(), n_s, rtol=tol, atol=tol)
    torch.testing.assert_close(o_l.double(), n_l, rtol=tol, atol=tol)


@pytest.mark.parametrize("B, H, N, D, block", [(1, 1, 1, 8, 64), (2, 3, 50, 16, 64), (1, 2, 129, 64, 64),
                                               (2, 2, 100, 32, 16)], ids=["N1", "one-block", "partial", "many"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_topk1_is_sdpa(B, H, N, D, block, dtype):
    q, k, v = _qkv((B, H, N, D), dtype, seed=N)
    proj_l = nn.Linear(D, D, dtype=dtype)
    nn.init.zeros_(proj_l.weight), nn.init.zeros_(proj_l.bias)  # as SLAAttention starts
    o = lite3r.sla_attention(q, k, v, topk=1.0, block_q=block, block_k=block, proj_l=proj_l)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype)
    torch.testing.assert_close(o, ref, rtol=0 if dtype == torch.float32 else 1.6e-2,
                               atol=2e-6 if dtype == torch.float32 else 1e-2)


def test_topk_below_one_is_not_dense():
    q, k, v = _qkv((1, 2, 96, 8), torch.float32)
    o = lite3r.sla_attention(q, k, v, topk=0.3, block_q=16, block_k=16)
    assert (o - F.scaled_dot_product_attention(q, k, v)).abs().max() > 1e-3


def test_sparse_reference_memory_is_what_it_keeps():
    """At 1/64 of the key blocks kept, N = 8192 never allocates an N x N (256 MiB fp32) buffer."""
    q, k, v = _qkv((1, 1, 8192, 16), torch.float32)
    proj_l = nn.Linear(16, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.no_grad():
            lite3r.sla_attention(q, k, v, topk=1 / 128, block_q=64, block_k=64, proj_l=proj_l)
    biggest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < biggest < 8192 * 8192 * 4 / 32, biggest


# ------------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("feature_map", sorted(lite3r.FEATURE_MAPS))
@pytest.mark.parametrize("N, bq, bk, kept", [(11, 4, 4, 2), (5, 8, 8, 1), (13, 4, 6, 3)],
                         ids=["partial", "sub-block", "all-kept"])
def test_gradcheck_reference(feature_map, N, bq, bk, kept):
    """d/d(q, k, v, W, b) of o_s + o_l W^T + b: finite differences (gradcheck), then the autograd gradients of the
    naive oracle, for a fixed LUT (the LUT is piecewise constant in q and k)."""
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, N, 4), seed=N))
    W = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    lut = lite3r.sla_block_map(q, k, topk=_topk_for(kept, -(-N // bk)), block_q=bq, block_k=bk)

    def f(q, k, v, W, b):
        o_s, o_l = lite3r.sla_reference(q, k, v, lut, block_q=bq, block_k=bk, feature_map=feature_map)
        return o_s + o_l @ W.T + b

    assert torch.autograd.gradcheck(f, (q, k, v, W, b), fast_mode=True)  # random projections of the Jacobian
    g = torch.randn(1, 2, N, 4, dtype=torch.float64)
    ours = torch.autograd.grad(f(q, k, v, W, b), (q, k, v, W, b), g)
    naive = torch.autograd.grad(naive_sla(q, k, v, lut, bq, bk, feature_map, W, b), (q, k, v, W, b), g)
    for name, a, r in zip("qkvWb", ours, naive):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


def test_sla_attention_grads_reach_proj_l_and_inputs():
    """The module path: proj_l gets its gradient through sla_attention, equal to the oracle's."""
    q, k, v = (t.requires_grad_() for t in _qkv((2, 2, 37, 8), seed=1))
    proj_l = nn.Linear(8, 8, dtype=torch.float64)
    o = lite3r.sla_attention(q, k, v, topk=0.5, block_q=8, block_k=8, feature_map="elu", proj_l=proj_l)
    g = torch.randn_like(o)
    ours = torch.autograd.grad(o, (q, k, v, proj_l.weight, proj_l.bias), g)
    lut = lite3r.sla_block_map(q, k, topk=0.5, block_q=8, block_k=8)
    ref = naive_sla(q, k, v, lut, 8, 8, "elu", proj_l.weight, proj_l.bias)
    naive = torch.autograd.grad(ref, (q, k, v, proj_l.weight, proj_l.bias), g)
    for a, r in zip(ours, naive):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("branches", ["both", "linear"])
def test_bf16_features_with_an_fp32_proj_l(branches):
    """bf16 q / k / v with the student's fp32 proj_l outside autocast: proj_l runs on the features cast to its
    dtype (F.linear alone refuses mixed dtypes), the output is bf16 and matches the fp32 computation."""
    q, k, v = _qkv((1, 2, 40, 8), seed=4)
    proj_l = nn.Linear(8, 8)
    with torch.no_grad():
        proj_l.weight.normal_(0, 0.3)
    kw = dict(topk=0.5, block_q=8, block_k=8, proj_l=proj_l, branches=branches)
    got = lite3r.sla_attention(*(t.float().bfloat16() for t in (q, k, v)), **kw)
    want = lite3r.sla_attention(*(t.float().bfloat16().float() for t in (q, k, v)), **kw)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


# -------------------------------------------------------------------------------------------------- dispatch
def _fake_kernels(available=True, supports=True, calls=None):
    calls = [] if calls is None else calls

    def sla_branches(q, k, v, *, topk, block_q, block_k, feature_map, lut=None):
        calls.append((topk, block_q, block_k, feature_map))
        return torch.zeros_like(q), torch.ones_like(q)

    def sup(t):
        if supports == "raise":
            raise RuntimeError("broken")
        return supports

    return types.SimpleNamespace(AVAILABLE=available, supports=sup, sla_branches=sla_branches), calls


@pytest.mark.parametrize("available, supports, used", [(True, True, True), (False, True, False),
                                                       (True, False, False), (True, "raise", False)])
def test_auto_dispatch_guards(monkeypatch, available, supports, used):
    monkeypatch.setenv("LITE3R_BACKEND", "auto")
    monkeypatch.setattr(lite3r, "_AUTO_DEVICES", ("cpu", "cuda"))  # pretend CPU is a kernel device
    fake, calls = _fake_kernels(available, supports)
    monkeypatch.setattr(lite3r, "_KERNELS", [fake])
    q, k, v = _qkv((1, 1, 20, 4), torch.float32)
    proj_l = nn.Linear(4, 4)
    o = lite3r.sla_attention(q, k, v, topk=0.5, block_q=8, block_k=8, feature_map="relu", proj_l=proj_l)
    assert bool(calls) == used
    if used:
        assert calls == [(0.5, 8, 8, "relu")]
        torch.testing.assert_close(o, proj_l(torch.ones_like(q)))  # o_s + proj_l(o_l) of what the kernel returned
    else:
        torch.testing.assert_close(o, lite3r.sla_attention(q, k, v, topk=0.5, block_q=8, block_k=8,
                                                           feature_map="relu", proj_l=proj_l))


def test_auto_never_picks_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("LITE3R_BACKEND", "auto")
    fake, calls = _fake_kernels(True, True)
    monkeypatch.setattr(lite3r, "_KERNELS", [fake])
    q, k, v = _qkv((1, 1, 20, 4), torch.float32)
    lite3r.sla_attention(q, k, v, topk=0.5, block_q=8, block_k=8)
    assert calls == []
    monkeypatch.setenv("LITE3R_BACKEND", "triton")  # forcing still reaches the kernels on CPU
    lite3r.sla_attention(q, k, v, topk=0.5, block_q=8, block_k=8)
    assert len(calls) == 1


def test_backend_env(monkeypatch):
    q, k, v = _qkv((1, 1, 8, 4), torch.float32)
    monkeypatch.setattr(lite3r, "_KERNELS", [None])  # kernels not importable
    monkeypatch.setenv("LITE3R_BACKEND", "auto")
    lite3r.sla_attention(q, k, v, topk=1.0)
    monkeypatch.setenv("LITE3R_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="LITE3R_BACKEND=triton"):
        lite3r.sla_attention(q, k, v, topk=1.0)
    monkeypatch.setenv("LITE3R_BACKEND", "cuda")
    with pytest.raises(ValueError, match="LITE3R_BACKEND"):
        lite3r.sla_attention(q, k, v, topk=1.0)
    monkeypatch.setenv("LITE3R_BACKEND", "torch")
    fake, calls = _fake_kernels()
    monkeypatch.setattr(lite3r, "_KERNELS", [fake])
    lite3r.sla_attention(q, k, v, topk=1.0)
    assert not calls


def test_argument_errors():
    q, k, v = _qkv((1, 2, 8, 4), torch.float32)
    with pytest.raises(ValueError, match="feature_map"):
        lite3r.sla_attention(q, k, v, topk=1.0, feature_map="cosine")
    if lite3r.TYPECHECK:
        with pytest.raises(Exception, match="[Tt]ype|shape|dim"):
            lite3r.sla_attention(q[0], k[0], v[0], topk=1.0)  # [H, N, D]: not [B, H, N, D]
        with pytest.raises(Exception, match="[Tt]ype|shape|dim"):
            lite3r.sla_attention(q, k[..., :2], v, topk=1.0)  # D differs between q and k


def test_auto_dispatch_dtype_and_fp8(monkeypatch):
    """fp64 never goes to the kernels (they take fp32/fp16/bf16); fp8_fake_quant / fp8_quantize dispatch too."""
    monkeypatch.setenv("LITE3R_BACKEND", "auto")
    monkeypatch.setattr(lite3r, "_AUTO_DEVICES", ("cpu", "cuda"))  # pretend CPU is a kernel device
    fake, calls = _fake_kernels()
    fake.fp8_fake_quant = lambda x, *, axis: calls.append(("fq", axis)) or x
    fake.fp8_quantize = lambda x, *, axis: calls.append(("q", axis)) or (x, x)
    monkeypatch.setattr(lite3r, "_KERNELS", [fake])
    q, k, v = _qkv((1, 1, 20, 4))
    lite3r.sla_attention(q, k, v, topk=0.5)
    assert not calls
    x = torch.randn(3, 16)
    assert lite3r.fp8_fake_quant(x, axis=0) is x and lite3r.fp8_quantize(x, axis=-1)[0] is x
    assert calls == [("fq", 0), ("q", -1)]
    assert lite3r.fp8_fake_quant(x, axis=0, dtype=torch.float8_e5m2) is not x  # e5m2: reference only
