"""VGGT tracking head: parity with the official code (tests/fixtures/vggt_track_parity.safetensors, made by
tests/fixtures/make_track_fixture.py), strict loading of the official key set, the model API, and students."""
import copy
import gc
import importlib.util
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from lite3r_backbones import build_backbone, load_checkpoint
from lite3r_backbones.checkpoint import CheckpointError
from lite3r_backbones.track_head import TrackHead

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def _module(path: pathlib.Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fx():
    return load_file(str(FIXTURES / "vggt_track_parity.safetensors"))


@pytest.fixture(scope="module")
def official_head(shared_reference):
    """The lite3r TrackHead of VGGT-1B with the recipe's track_head.* tensors, loaded strictly."""
    recipe = _module(shared_reference / "weights_recipe.py", "weights_recipe")
    manifest = json.loads((shared_reference / "vggt_1b_state_dict_manifest.json").read_text())
    sd = {k[len("track_head."):]: recipe.recipe_tensor(k, shape) for k, (shape, _) in manifest.items()
          if k.startswith("track_head.")}
    assert len(sd) == 394
    with torch.device("meta"):
        head = TrackHead(2048)
    return load_checkpoint(head, sd, strict=True).eval()


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Max error over the reference's spread."""
    return float((got.float() - ref.float()).abs().max() / ref.float().std())


@pytest.mark.shared
def test_head_matches_official_step_by_step(official_head, fx):
    """Feature maps, every refinement step from the official state, and the scores: to float rounding."""
    mk = _module(FIXTURES / "make_track_fixture.py", "make_track_fixture")
    tokens, hw = mk.head_tokens(), mk.HEAD_HW
    head = official_head
    with torch.inference_mode():
        fmaps = head.feature_extractor(tokens, hw, 5)
        assert _rel(fmaps[..., ::7, ::7], fx["head_fmaps_sub"]) < 1e-5
        ctx, coords, feats = head.tracker.prepare(fx["head_query_points"], fmaps)
        torch.testing.assert_close(coords, fx["head_state_coords"][0], rtol=0, atol=0)
        assert _rel(feats, fx["head_state_feats"][0]) < 1e-5
        iters = fx["head_tracks"].shape[0]
        for i in range(iters):
            coords, feats = head.tracker.step(ctx, fx["head_state_coords"][i], fx["head_state_feats"][i])
            ref_c = fx["head_state_coords"][i + 1] if i + 1 < iters else fx["head_tracks"][-1] / 2
            ref_f = fx["head_state_feats"][i + 1] if i + 1 < iters else fx["head_final_feats"]
            assert float((coords - ref_c).abs().max()) < 1e-4, (i, float((coords - ref_c).abs().max()))
            assert _rel(feats, ref_f) < 1e-4, (i, _rel(feats, ref_f))
        vis, conf = head.tracker.scores(fx["head_final_feats"])
        torch.testing.assert_close(vis, fx["head_vis"], rtol=0, atol=1e-6)
        torch.testing.assert_close(conf, fx["head_conf"], rtol=0, atol=1e-6)


@pytest.mark.shared
def test_head_free_run_matches_official(official_head, fx):
    """The whole head from tokens: the first step to rounding; later steps drift by amplified rounding only (the
    motion embedding's frequencies reach ~970 rad per feature pixel), bounded here in pixels."""
    mk = _module(FIXTURES / "make_track_fixture.py", "make_track_fixture")
    with torch.inference_mode():
        tracks, vis, conf = official_head(mk.head_tokens(), mk.HEAD_HW, 5, fx["head_query_points"])
    ref = fx["head_tracks"]
    assert len(tracks) == ref.shape[0]
    assert float((tracks[0] - ref[0]).abs().max()) < 1e-4
    torch.testing.assert_close(tracks[-1][:, 0], fx["head_query_points"], rtol=0, atol=0)  # frame 0 is the query
    assert float((tracks[-1] - ref[-1]).abs().max()) < 1.0
    # vis / conf read the 4th step's features: 0.012 / 0.021 off on a fresh torch 2.13 CPU venv (bound 0.02 before);
    # a broken head is ~0.2 off
    assert float((vis - fx["head_vis"]).abs().max()) < 0.03 and float((conf - fx["head_conf"]).abs().max()) < 0.03


def test_vggt_1b_keys_are_the_official_ones(shared_reference):
    """Every key and shape of the official VGGT-1B state dict, track_head.* included, and nothing else."""
    manifest = json.loads((shared_reference / "vggt_1b_state_dict_manifest.json").read_text())
    model = build_backbone("vggt-1b", device="meta")
    assert model.optional_checkpoint_prefixes == ()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: shape for k, (shape, _) in manifest.items()}


@pytest.mark.slow
@pytest.mark.shared
def test_vggt_1b_strict_load_and_track_parity(shared_reference, fx):
    """The official-format VGGT-1B state dict loads with strict=True and no skipped prefix; model(images,
    query_points) tracks as the official VGGT.forward does (2 x 196 x 280, fp32, CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        recipe = _module(shared_reference / "weights_recipe.py", "weights_recipe")
        model = build_backbone("vggt-1b", device="meta")
        sd = recipe.recipe_state_dict(str(shared_reference / "vggt_1b_state_dict_manifest.json"))
        load_checkpoint(model, sd, strict=True)
        del sd
        gc.collect()
        images = load_file(str(shared_reference / "vggt_parity_2x196x280.safetensors"))["images"]
        with torch.inference_mode():
            out = model.eval()(images, query_points=fx["full_query_points"][0])  # [Q, 2]: unbatched queries
    finally:
        torch.set_num_threads(threads)
    assert out["track"].shape == fx["full_track"].shape == (1, 2, 5, 2)
    assert out["vis"].shape == out["conf"].shape == (1, 2, 5)
    # the aggregator agrees to ~1e-5 relative; the 4 refinements amplify that as in the free-run test above
    assert float((out["track"] - fx["full_track"]).abs().max()) < 0.5  # measured 0.13 px
    assert float((out["vis"] - fx["full_vis"]).abs().max()) < 0.04  # measured 0.016 (vis spread 0.13)
    assert float((out["conf"] - fx["full_conf"]).abs().max()) < 0.04  # measured 0.015


@pytest.fixture(scope="module")
def tiny():
    # a seeded random init: these tests check the tracker's code paths to rounding. The shipped teacher's tracker is
    # trained (session 11) and on noise images its refinements amplify rounding to pixels (1.9 px between batch
    # sizes, 2.5 px dense vs SLA at topk 1); the file shipped before had this random tracking head.
    torch.manual_seed(0)
    return build_backbone("vggt-tiny", weights="random").eval()


def test_tiny_model_tracks(tiny):
    images = torch.rand(1, 3, 3, 56, 70)
    query = torch.tensor([[5.0, 7.0], [30.5, 20.25], [69.0, 55.0]])
    with torch.inference_mode():
        plain = tiny(images)
        out = tiny(images, query_points=query)
        batched = tiny(images, query_points=query[None])
    assert out["track"].shape == (1, 3, 3, 2) and out["vis"].shape == out["conf"].shape == (1, 3, 3)
    torch.testing.assert_close(out["track"][:, 0], query[None], rtol=0, atol=0)
    assert ((out["vis"] > 0) & (out["vis"] < 1) & (out["conf"] > 0) & (out["conf"] < 1)).all()
    assert "track" not in plain
    torch.testing.assert_close(out["depth"], plain["depth"], rtol=0, atol=0)  # tracking changes nothing else
    torch.testing.assert_close(batched["track"], out["track"], rtol=0, atol=0)
    with torch.inference_mode():
        two = tiny(images.expand(2, -1, -1, -1, -1), query_points=query[None].expand(2, -1, -1))
    # another batch size rounds differently; the refinements amplify it (see the free-run test): pixels apart
    assert float((two["track"][1] - out["track"][0]).abs().max()) < 0.05


def test_bf16_heads_keep_fp32_coordinates(tiny):
    """With head_dtype="bfloat16" the tracker's math runs in bf16, but coordinates, sampling grids and scores stay
    fp32 (a bf16 pixel coordinate near 500 px is only good to 2-4 px)."""
    bf = build_backbone("vggt-tiny", head_dtype="bfloat16").eval()
    bf.load_state_dict(tiny.state_dict())
    query = torch.tensor([[5.25, 7.5], [60.75, 50.125]])
    with torch.inference_mode():
        out = bf(torch.rand(1, 2, 3, 56, 70), query_points=query)
    assert out["track"].dtype == out["vis"].dtype == out["conf"].dtype == torch.float32
    torch.testing.assert_close(out["track"][0, 0], query, rtol=0, atol=0)
    assert torch.isfinite(out["track"]).all()


def test_track_errors(tiny):
    images = torch.rand(1, 2, 3, 56, 70)
    with pytest.raises(ValueError, match=r"query_points \[B,Q,2\]"):
        tiny(images, query_points=torch.rand(4, 3))
    with pytest.raises(ValueError, match=r"query_points \[B,Q,2\]"):
        tiny(images, query_points=torch.rand(3, 4, 2))  # 3 query batches for 1 image batch
    deep = build_backbone("vggt-tiny", track_corr_levels=5).eval()  # 5 levels on 1/2 maps: 32 px a side
    with pytest.raises(ValueError, match="at least 32 px"), torch.inference_mode():
        deep(torch.rand(1, 2, 3, 28, 70), query_points=torch.rand(4, 2))
    no_track = build_backbone("vggt-tiny", enable_track=False)
    with pytest.raises(ValueError, match="enable_track=False"):
        no_track(images, query_points=torch.rand(4, 2))


def test_optional_prefixes_are_the_truth(tiny):
    """A model without the tracking head skips track_head.* only when asked; with it, nothing is optional."""
    sd = tiny.state_dict()
    assert tiny.optional_checkpoint_prefixes == () and any(k.startswith("track_head.") for k in sd)
    no_track = build_backbone("vggt-tiny", enable_track=False)
    assert no_track.optional_checkpoint_prefixes == ("track_head.",)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_checkpoint(no_track, sd)
    load_checkpoint(no_track, sd, skip_prefixes=no_track.optional_checkpoint_prefixes)
    torch.testing.assert_close(no_track.state_dict()["depth_head.norm.weight"], sd["depth_head.norm.weight"])


def test_tracking_gradients_reach_the_head(tiny):
    model = copy.deepcopy(tiny).train()
    out = model(torch.rand(1, 2, 3, 56, 70), query_points=torch.tensor([[10.0, 12.0], [40.0, 30.0]]))
    (out["track"].square().mean() + out["vis"].mean() + out["conf"].mean()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("track_head.")}
    assert grads["track_head.tracker.updateformer.flow_head.weight"] is not None
    assert grads["track_head.feature_extractor.projects.0.weight"] is not None
    assert grads["track_head.tracker.vis_predictor.0.weight"] is not None


@pytest.mark.parametrize("fp8", [False, True])
def test_student_keeps_tracking(monkeypatch, tiny, fp8):
    """swap_attention leaves the tracking head dense and full precision (no SLA on its nn.MultiheadAttention, no
    FP8 on its PreciseLinear layers); at topk=1 without FP8 the student tracks exactly as the dense model."""
    lite3r = pytest.importorskip("lite3r")
    monkeypatch.setenv("LITE3R_BACKEND", "torch")
    student = copy.deepcopy(tiny)
    report = lite3r.swap_attention(student, topk=1.0, fp8=fp8)
    assert (report.linear_swapped > 0) == fp8
    head = student.track_head
    assert not any(isinstance(m, (lite3r.SLAAttention, lite3r.FP8FakeQuantLinear)) for m in head.modules())
    assert sum(isinstance(m, torch.nn.MultiheadAttention) for m in head.modules()) == 4 * tiny.config.track_depth
    assert all(type(m) is not torch.nn.Linear for m in head.tracker.modules())
    images = torch.rand(1, 2, 3, 56, 70)
    query = torch.tensor([[5.0, 7.0], [30.5, 20.25]])
    with torch.inference_mode():
        a, b = tiny(images, query_points=query), student(images, query_points=query)
    assert torch.isfinite(b["track"]).all() and torch.isfinite(b["vis"]).all()
    torch.testing.assert_close(b["track"][:, 0], query[None], rtol=0, atol=0)
    if not fp8:
        torch.testing.assert_close(b["track"], a["track"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b["vis"], a["vis"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape, levels, radius", [((1, 3, 16, 37, 50), 4, 3), ((2, 2, 8, 20, 9), 2, 4)])
def test_correlation_windows_equal_the_volume(shape, levels, radius):
    """Sampling features at the window points = sampling the official correlation volume (bilinear is linear, zero
    padding is zero), also for windows reaching past the borders; `sample` switches by volume size."""
    from lite3r_backbones.track_head import CorrPyramid

    g = torch.Generator().manual_seed(0)
    B, S, C, h, w = shape
    pyramid = CorrPyramid(torch.randn(*shape, generator=g), levels, radius)
    feats = torch.randn(B, S, 11, C, generator=g)
    coords = torch.rand(B, S, 11, 2, generator=g) * torch.tensor([w + 10.0, h + 10.0]) - 5  # some outside
    ref = pyramid.sample_volume(feats, coords)
    assert ref.shape == (B, S, 11, levels * (2 * radius + 1) ** 2) and ref.abs().max() > 0
    torch.testing.assert_close(pyramid.sample_windows(feats, coords), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pyramid.sample(feats, coords, volume_limit=0), pyramid.sample_windows(feats, coords))
    torch.testing.assert_close(pyramid.sample(feats, coords), ref, rtol=0, atol=0)  # small: the official order
