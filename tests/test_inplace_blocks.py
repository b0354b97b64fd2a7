"""Memory at many views (issue 17): at inference the transformer blocks add into the residual stream in place
(layers.Block's ``inplace``) and a kept layer is stored a half at a time (kept.KeptLayer), so no copy of the
stream or of a mapped / reordered half exists - with the same outputs as the out-of-place computation."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lite3r_backbones import build_backbone
from lite3r_backbones.kept import KeptFP8, KeptLayer, kept_layer
from lite3r_backbones.layers import Block


@pytest.mark.parametrize("mlp_chunk", [None, 7])
@pytest.mark.parametrize("init_values", [None, 0.5])
def test_block_inplace_equals_out_of_place(mlp_chunk, init_values):
    torch.manual_seed(0)
    blk = Block(32, 4, init_values=init_values).eval()
    blk.mlp_chunk = mlp_chunk
    x = torch.randn(2, 20, 32)
    with torch.no_grad():
        kept = x.clone()
        want = blk(kept)
        assert torch.equal(kept, x)  # without inplace the input is left as it was (a kept layer's frame half)
        given_x = x.clone()
        got = blk(given_x, inplace=True)
    assert got is given_x  # written into its input: no second residual stream
    assert torch.equal(got, want)  # one addcmul either way: the same bits (keeping more layers changes nothing)
    # with grad the flag is ignored: a new tensor, differentiable
    x.requires_grad_(True)
    y = blk(x, inplace=True)
    assert y is not x and y.grad_fn is not None
    torch.testing.assert_close(y.detach(), want, rtol=1e-6, atol=1e-6)


def test_inplace_add_keeps_out_of_place_dtype_rules():
    """x + ls(y) would be fp32 for a bf16 stream and an fp32 LayerScale: then nothing is written into x."""
    from lite3r_backbones.layers import LayerScale, _add_scaled_

    x, y = torch.randn(3, 8).to(torch.bfloat16), torch.randn(3, 8).to(torch.bfloat16)
    keep = x.clone()
    assert not _add_scaled_(x, y, LayerScale(8, 0.5)) and torch.equal(x, keep)
    x32 = x.float()
    assert _add_scaled_(x32, y, LayerScale(8, 0.5)) and torch.equal(x32, x.float() + y * torch.full((8,), 0.5))
    assert _add_scaled_(x32, y, torch.nn.Identity())


@settings(max_examples=20, deadline=None)
@given(S=st.integers(1, 6), chunk=st.sampled_from([None, 1, 2, 4]), fp8=st.booleans(), prefix=st.integers(0, 2),
       seed=st.integers(0, 2**16))
def test_kept_layer_half_at_a_time_with_a_view_order(S, chunk, fp8, prefix, seed):
    """KeptLayer with frames in `order` == kept_layer of the reordered halves (the second through a LayerNorm)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(2, S, 5, 8, generator=gen), torch.randn(2, S, 5, 8, generator=gen)
    order = torch.stack([torch.randperm(S, generator=gen) for _ in range(2)])
    norm = torch.nn.LayerNorm(8)
    take = lambda t: t[torch.arange(2)[:, None], order]  # noqa: E731
    with torch.no_grad():
        want = kept_layer((take(a), take(b)), prefix, fp8=fp8, chunk=None, maps=(None, norm))
        layer = KeptLayer(2, prefix, fp8=fp8, chunk=chunk, order=order)
        layer.put(a)
        a.zero_()  # the first half may be overwritten once it is put (the in-place global block)
        layer.put(b, norm)
        got = layer.result()
    assert isinstance(got, KeptFP8) == fp8
    assert torch.equal(got[:, :, :], want[:, :, :])
    with pytest.raises(RuntimeError, match="already"):
        layer.put(b)


@pytest.mark.parametrize("name", ["vggt-tiny", "da3-tiny"])
def test_models_inplace_equal_out_of_place(name, monkeypatch):
    """The whole model at inference (views reordered by DA3's reference choice, token chunks, kept layers in FP8 and
    not) equals the same model with every block out of place."""
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    images = torch.rand(1, 4, 3, 42, 56)
    opts = {"mlp_chunk_tokens": 40}
    if name == "da3-tiny":
        opts["ref_view_strategy"] = "saddle_balanced"
    for kept_fp8 in (False, True):
        model.config = dataclasses.replace(model.config, kept_fp8=kept_fp8, **opts)
        with torch.no_grad():
            got = model(images)
            with monkeypatch.context() as m:
                forward = Block.forward
                m.setattr(Block, "forward", lambda self, x, pos=None, inplace=False: forward(self, x, pos))
                want = model(images)
        for k, v in want.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=f"{name} {k} kept_fp8={kept_fp8}")


def test_da3_reference_view_reorder_puts_the_kept_layers_back(monkeypatch):
    """DA3 moves its reference view to the front before the cross-view blocks and stores each kept layer's frames
    back in input order (half by half, in place): its per-view outputs on the input order must equal those of the
    same views given reference-first with ref_view_strategy="first", put back in input order."""
    from lite3r_backbones import da3

    torch.manual_seed(0)
    model = build_backbone("da3-tiny").eval()
    images = torch.rand(1, 5, 3, 42, 56)
    for kept_fp8 in (False, True):
        model.config = dataclasses.replace(model.config, ref_view_strategy="saddle_balanced", kept_fp8=kept_fp8,
                                           mlp_chunk_tokens=60, frames_chunk_size=2)
        with torch.no_grad():
            got = model(images)
            chosen = []
            select = da3.select_reference_view
            monkeypatch.setattr(da3, "select_reference_view", lambda x, s: chosen.append(select(x, s)) or chosen[-1])
            model(images)
            monkeypatch.undo()
            ref = int(chosen[0][0])
            assert ref != 0  # the case under test: a real reorder
            order = [ref] + [i for i in range(5) if i != ref]
            model.config = dataclasses.replace(model.config, ref_view_strategy="first")
            first = model(images[:, order])
        back = torch.argsort(torch.tensor(order))
        for k in ("depth", "depth_conf"):
            torch.testing.assert_close(got[k], first[k][:, back], rtol=1e-4, atol=1e-5, msg=f"{k} fp8={kept_fp8}")


@pytest.mark.parametrize("name", ["vggt-tiny", "da3-tiny"])
def test_kept_layers_are_stored_after_their_global_block(name, monkeypatch):
    """No kept layer is half stored while a global attention runs (its global block runs out of place, both halves
    are stored after it): a frame half stored first would hold the layer's storage through the global attention,
    the forward's peak (session 13: +2.7 GiB at 1024 VGGT views)."""
    model = build_backbone(name, kept_fp8=True).eval()
    layers, seen = [], []
    real_init = KeptLayer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        layers.append(self)

    monkeypatch.setattr(KeptLayer, "__init__", init)
    blocks = (model.aggregator.global_blocks if name.startswith("vggt") else
              [b for b in model.backbone.pretrained.blocks if b.attn.scope == "global"])
    for blk in blocks:
        blk.attn.register_forward_pre_hook(lambda m, a: seen.append([l.filled for l in layers]))
    with torch.inference_mode():
        model(torch.rand(1, 2, 3, 56, 70))
    assert len(layers) == 4 and all(l.filled == 2 for l in layers) and len(seen) == len(blocks)
    assert all(f in (0, 2) for filled in seen for f in filled), seen  # never 1 (half stored) at a global attention


def test_chunk_loops_free_each_chunk_before_the_next():
    """Inference over token chunks (SLAAttention's q / k / v projection, a Block's MLP): a chunk's transients are
    dead when the next chunk is computed, so the peak holds one chunk's, not two (session 14: 224 MiB of DA3's
    peak at 16k-token chunks, 896 MiB at 64k)."""
    import weakref

    import lite3r

    torch.manual_seed(0)
    blk = Block(32, 4).eval()
    lite3r.swap_attention(blk, lite3r.SLAConfig(topk=0.5, block_q=8, block_k=8), fp8=False)
    sla = blk.attn
    sla.chunk_tokens = 16
    blk.mlp_chunk = 16
    alive: list[list] = []

    def watch(module, name):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            out = real(*args, **kwargs)
            outs = out if isinstance(out, tuple) else (out,)
            alive.append([weakref.ref(t) for t in outs if torch.is_tensor(t)])  # this chunk's q / k / v or MLP output
            return out
        return wrapped

    sla._qkv = watch(sla, "_qkv")
    blk.mlp.forward = watch(blk.mlp, "forward")
    live_at_call: list[int] = []
    real_qkv, real_mlp = sla._qkv, blk.mlp.forward

    def before(fn):
        def call(*args, **kwargs):
            live_at_call.append(sum(r() is not None for refs in alive for r in refs))
            return fn(*args, **kwargs)
        return call

    sla._qkv, blk.mlp.forward = before(real_qkv), before(real_mlp)
    x = torch.randn(1, 50, 32)
    with torch.no_grad():
        want = blk(x.clone())
        alive.clear(), live_at_call.clear()
        got = blk(x.clone(), inplace=True)
    assert len(live_at_call) == 8  # 4 chunks of the projection, 4 of the MLP
    assert live_at_call == [0] * 8, live_at_call  # nothing of the previous chunk is alive when the next starts
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
