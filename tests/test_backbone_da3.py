"""Depth Anything 3 backbone: tiny-model behaviour on CPU, plus parity with the official network (recipe weights)."""
import dataclasses
import importlib.util
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lite3r_backbones import CheckpointError, build_backbone, load_checkpoint, to_cameras
from lite3r_backbones.da3 import (
    extri_intri_to_pose_encoding,
    normalize_images,
    pose_encoding_to_extri_intri,
    reference_order,
)


def _tiny(**overrides):
    torch.manual_seed(0)
    return build_backbone("da3-tiny", weights="random", **overrides).eval()  # the architecture, not the teacher


def _images(S=3, H=126, W=168, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, S, 3, H, W, generator=g)


def test_tiny_forward_backward_shapes():
    model = build_backbone("da3-tiny", with_ray=True).train()
    images = _images(S=2)
    out = model(images)
    assert out["depth"].shape == (1, 2, 126, 168) and out["depth_conf"].shape == (1, 2, 126, 168)
    assert out["extrinsics"].shape == (1, 2, 3, 4) and out["intrinsics"].shape == (1, 2, 3, 3)
    assert out["ray"].shape == (1, 2, 72, 96, 6) and out["ray_conf"].shape == (1, 2, 72, 96)
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all()
    loss = out["depth"].mean() + out["extrinsics"].square().mean() + out["ray"].square().mean()
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None and not n.startswith("cam_enc.")]
    # only the 3 unused aux levels of the ray head (the official net uses the last one only) get no gradient
    assert all(".output_conv1_aux." in n or ".output_conv2_aux." in n for n in no_grad), no_grad
    assert not any(n.startswith(("head.scratch.output_conv1_aux.3.", "head.scratch.output_conv2_aux.3.")) for n in no_grad)
    cams = to_cameras("da3-tiny", out, (126, 168))
    assert set(cams) == {"extrinsics", "intrinsics", "depth", "depth_conf"}
    # extrinsics are rigid w2c: R orthonormal
    R = out["extrinsics"][..., :3].detach()
    torch.testing.assert_close(R @ R.mT, torch.eye(3).expand_as(R), atol=1e-5, rtol=0)


def test_scopes_queryable_and_recognised_by_lite3r(monkeypatch):
    lite3r = pytest.importorskip("lite3r")
    monkeypatch.setenv("LITE3R_BACKEND", "torch")  # the PyTorch SLA reference (kernels are tested elsewhere)
    model = _tiny()
    scopes = model.attention_scopes()
    blocks = {n: s for n, s in scopes.items() if n.startswith("backbone.pretrained.blocks.")}
    assert len(blocks) == 6
    cfg = model.config
    for i in range(cfg.depth):
        attn = model.backbone.pretrained.blocks[i].attn
        assert lite3r.is_attention(attn)
        assert attn.scope == ("global" if i >= cfg.alt_start and i % 2 else "frame")
        assert (attn.rope is not None) == (i >= cfg.rope_start)
        assert isinstance(attn.q_norm, torch.nn.LayerNorm) == (i >= cfg.qknorm_start)
    assert sorted(n for n, s in blocks.items() if s == "global") == [
        "backbone.pretrained.blocks.3.attn", "backbone.pretrained.blocks.5.attn"
    ]
    # lite3r finds every attention (6 trunk blocks + the camera encoder's) without DA3-specific code; dense SLA
    # (topk=1, zero-initialised linear branch) computes the same network
    images = _images(S=2)
    with torch.inference_mode():
        ref = model(images)["depth"]
    report = lite3r.swap_attention(model, topk=1.0, fp8=False)
    assert report.attention_swapped == len(scopes) == cfg.depth + cfg.cam_enc_depth
    assert {n: getattr(m, "scope", None) for n, m in model.named_modules() if lite3r.is_attention(m)} == scopes
    with torch.inference_mode():
        torch.testing.assert_close(model(images)["depth"], ref, rtol=1e-4, atol=1e-5)


def test_view_permutation_equivariant():
    """With >= 3 views the reference view is picked from content and moved first, then the original order is
    restored: permuting the input views permutes every output the same way (checks reorder + restore)."""
    model = _tiny()
    images = _images(S=4)
    perm = torch.tensor([2, 0, 3, 1])
    with torch.inference_mode():
        a, b = model(images), model(images[:, perm])
    for k in ("depth", "depth_conf", "extrinsics", "intrinsics"):
        torch.testing.assert_close(b[k], a[k][:, perm], rtol=1e-4, atol=1e-5)


def test_reference_strategy_changes_the_ordering():
    images = _images(S=3)
    with torch.inference_mode():
        outs = {s: _tiny(ref_view_strategy=s)(images)["extrinsics"] for s in ("first", "middle")}
    assert not torch.allclose(outs["first"], outs["middle"])  # the reference view gets the other camera token
    with pytest.raises(ValueError, match="ref_view_strategy"):
        build_backbone("da3-tiny", ref_view_strategy="best")


@settings(deadline=None, max_examples=20)
@given(S=st.integers(1, 6), ref=st.data())
def test_reference_order_is_a_permutation_with_ref_first(S, ref):
    r = ref.draw(st.integers(0, S - 1))
    order = reference_order(torch.tensor([r]), S)[0].tolist()
    assert order[0] == r and sorted(order) == list(range(S))
    assert [v for v in order[1:]] == [v for v in range(S) if v != r]  # others keep the input order


def test_normalize_option_and_helper():
    images = _images(S=2)
    with torch.inference_mode():
        inside = _tiny()(images)
        outside = _tiny(normalize=False)(normalize_images(images))
        raw = _tiny(normalize=False)(images)
    torch.testing.assert_close(inside["depth"], outside["depth"])
    assert not torch.allclose(inside["depth"], raw["depth"])


def test_grad_checkpointing_same_gradients():
    images = _images(S=2, H=70, W=84)
    grads = []
    for ckpt in (False, True):
        model = _tiny(grad_checkpointing=ckpt).train()
        model(images)["depth"].mean().backward()
        grads.append(model.backbone.pretrained.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_frame_chunks_match_one_batch():
    images = _images(S=3)
    with torch.inference_mode():
        a = _tiny(frames_chunk_size=1)(images)
        b = _tiny(frames_chunk_size=None)(images)
    for k in ("depth", "depth_conf"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2**31 - 1))
def test_pose_encoding_round_trip(seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, 4, generator=g)
    fov = 0.3 + 1.5 * torch.rand(2, 3, 2, generator=g)
    enc = torch.cat((torch.randn(2, 3, 3, generator=g), q / q.norm(dim=-1, keepdim=True), fov), dim=-1)
    enc[..., 3:7] = torch.where(enc[..., 6:7] < 0, -enc[..., 3:7], enc[..., 3:7])  # w >= 0 (canonical)
    ext, intr = pose_encoding_to_extri_intri(enc, (126, 168))
    torch.testing.assert_close(extri_intri_to_pose_encoding(ext, intr, (126, 168)), enc, atol=1e-4, rtol=1e-4)
    assert torch.allclose(intr[..., 0, 2], torch.tensor(84.0)) and torch.allclose(intr[..., 1, 2], torch.tensor(63.0))


def test_camera_conditioning():
    model = _tiny()
    images = _images(S=2)
    ext = torch.eye(4)[:3].expand(1, 2, 3, 4).clone()
    ext[0, 1, :, 3] = torch.tensor([0.5, 0.0, 0.0])
    intr = torch.tensor([[150.0, 0, 84], [0, 150.0, 63], [0, 0, 1]]).expand(1, 2, 3, 3)
    with torch.inference_mode():
        free, cond = model(images), model(images, ext, intr)
    assert cond["depth"].shape == free["depth"].shape
    assert not torch.allclose(cond["depth"], free["depth"])
    with pytest.raises(ValueError, match="together"):
        model(images, extrinsics=ext)


def test_vggt_checkpoint_into_da3_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    vggt = build_backbone("vggt-tiny")
    path = tmp_path / "vggt.safetensors"
    save_file({k: v.contiguous() for k, v in vggt.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="looks like a VGGT checkpoint, but the model is da3-tiny"):
        load_checkpoint(build_backbone("da3-tiny"), path)


def test_renamed_key_and_hub_prefix(tmp_path):
    from safetensors.torch import save_file

    model = _tiny()
    sd = {"model." + k: v.clone() for k, v in model.state_dict().items()}  # the hub file's layout
    path = tmp_path / "da3.safetensors"
    save_file(sd, str(path))
    fresh = build_backbone("da3-tiny", device="meta")
    load_checkpoint(fresh, path)
    images = _images(S=2)
    with torch.inference_mode():
        torch.testing.assert_close(fresh.eval()(images)["depth"], model(images)["depth"])
    sd["model.head.norm.weight_renamed"] = sd.pop("model.head.norm.weight")
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="head.norm.weight"):
        load_checkpoint(build_backbone("da3-tiny"), path)


@pytest.mark.slow
def test_parity_with_official_da3_large(shared_reference):
    """DA3-Large with the recipe weights reproduces the official network's outputs on raw [0,1] images."""
    from safetensors.torch import load_file

    spec = importlib.util.spec_from_file_location("weights_recipe", shared_reference / "weights_recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    manifest = shared_reference / "da3_large_state_dict_manifest_hub_prefix.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = build_backbone("da3-large", device="meta", normalize=False)  # the fixture feeds raw images
        sd = recipe.recipe_state_dict(str(manifest))
        assert all(k.startswith("model.") for k in sd) and len(sd) == len(json.load(open(manifest)))
        load_checkpoint(model, sd, strict=True)
        del sd
        fx = load_file(str(shared_reference / "da3_parity_2x196x280.safetensors"))
        with torch.inference_mode():
            out = model.eval()(fx["images"])
    finally:
        torch.set_num_threads(threads)
    for k in ("depth", "depth_conf"):
        err = (out[k] - fx[k]).abs().max() / fx[k].std()
        assert err < 1e-3, f"{k}: max error {err:.2e} of its std"
    for k in ("extrinsics", "intrinsics"):
        torch.testing.assert_close(out[k], fx[k], rtol=1e-4, atol=1e-4 * fx[k].abs().max().item())
    cams = to_cameras(model, out, fx["images"].shape[-2:])
    assert cams["depth"].shape == fx["depth"].shape


def test_bf16_weights_run_the_head_in_bf16():
    """A deployed DA3 (bf16 weights but the fp32 pose decoder, as `lite3r bench` (b)-(d) runs it) feeds its head bf16 features: fp32 features into bf16
    convolutions would be a dtype error."""
    from lite3r_backbones import build_backbone
    from lite3r_recon.deploy import deploy_model

    torch.manual_seed(0)
    model = deploy_model(build_backbone("da3-tiny").eval(), dtype=torch.bfloat16, compile_mode=None)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(1, 2, 3, 56, 56))
    assert torch.isfinite(out["depth"].float()).all() and out["depth"].shape[-2:] == (56, 56)
