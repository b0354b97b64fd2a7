"""recon.losses: the VGGT task loss pieces (pose encoding, scene normalisation, confidence losses, reductions)."""
import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from lite3r_backbones import cameras as C
from lite3r_recon import losses as L


def _scene(B=2, S=3, H=14, W=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = torch.from_numpy(Rotation.random(B * S, random_state=seed).as_matrix()).float().reshape(B, S, 3, 3)
    E = torch.cat([R, torch.randn(B, S, 3, 1, generator=g)], -1)
    K = torch.tensor([[20.0, 0, W / 2], [0, 22.0, H / 2], [0, 0, 1]]).expand(B, S, 3, 3).clone()
    depth = torch.rand(B, S, H, W, generator=g) * 2 + 1
    mask = torch.rand(B, S, H, W, generator=g) > 0.2
    return E, K, depth, mask


def test_quaternions_match_scipy_and_round_trip():
    R = Rotation.random(500, random_state=1)
    q = C.mat_to_quat(torch.from_numpy(R.as_matrix()).float())
    ref = torch.from_numpy(R.as_quat()).float()  # xyzw
    ref = torch.where(ref[:, 3:] < 0, -ref, ref)
    assert torch.allclose(q, ref, atol=2e-6)
    assert torch.allclose(C.quat_to_mat(q), torch.from_numpy(R.as_matrix()).float(), atol=2e-6)


def test_pose_encoding_round_trip():
    E, K, _, _ = _scene()
    enc = C.vggt_pose_encoding(E, K, (14, 18))
    assert enc.shape == (2, 3, 9)
    E2, K2 = C.vggt_pose_decoding(enc, (14, 18))
    assert torch.allclose(E2, E, atol=1e-5) and torch.allclose(K2, K, atol=1e-4)
    assert math.isclose(float(enc[0, 0, 7]), 2 * math.atan(7 / 22), rel_tol=1e-6)  # fov_h uses fy


def test_normalize_scene_frame0_world_unit_scale_and_consistency():
    E, K, depth, mask = _scene()
    gt = C.normalize_scene(E, K, depth, mask)
    eye = torch.eye(3, 4).expand(2, 3, 4)
    assert torch.allclose(gt["extrinsics"][:, 0], eye, atol=1e-5)
    dist = (gt["world_points"].norm(dim=-1) * gt["mask"]).flatten(1).sum(1) / gt["mask"].flatten(1).sum(1)
    assert torch.allclose(dist, torch.ones(2), atol=1e-5)
    # the normalised cameras map each view's points back to its normalised depth
    p = gt["world_points"]
    cam = torch.einsum("bsij,bshwj->bshwi", gt["extrinsics"][..., :3], p) + gt["extrinsics"][..., None, None, :, 3]
    m = gt["mask"]
    assert torch.allclose(cam[..., 2][m], gt["depth"][m], atol=1e-4)


def _perfect_pred(gt):
    B, S, H, W = gt["depth"].shape
    enc = C.vggt_pose_encoding(gt["extrinsics"], gt["intrinsics"], (H, W))
    ones = torch.ones(B, S, H, W)
    return dict(pose_enc=enc, depth=gt["depth"][..., None], depth_conf=ones, world_points=gt["world_points"],
                world_points_conf=ones)


def test_perfect_prediction_with_unit_confidence_costs_nothing():
    gt = C.normalize_scene(*_scene())
    out = L.vggt_task_loss(_perfect_pred(gt), gt)
    for k in ("camera", "depth_reg", "depth_grad", "point_reg", "point_conf", "task"):
        assert abs(float(out[k])) < 1e-5, (k, float(out[k]))


def test_losses_are_per_sample_means_and_differentiable():
    """A batch of two gives the mean of the two single-sample losses (the DDP property) and gradients reach every
    prediction that the loss reads."""
    gt = C.normalize_scene(*_scene())
    g = torch.Generator().manual_seed(3)
    pred = {k: (v + 0.05 * torch.randn(v.shape, generator=g)).requires_grad_(True) for k, v in _perfect_pred(gt).items()}
    pred["depth_conf"] = (1 + torch.rand(pred["depth_conf"].shape, generator=g)).requires_grad_(True)
    pred["world_points_conf"] = (1 + torch.rand(pred["depth_conf"].shape, generator=g)).requires_grad_(True)
    both = L.vggt_task_loss(pred, gt)
    one = [L.vggt_task_loss({k: v[i:i + 1] for k, v in pred.items()}, {k: v[i:i + 1] for k, v in gt.items()})
           for i in range(2)]
    for k in both:
        assert torch.allclose(both[k], (one[0][k] + one[1][k]) / 2, rtol=1e-5, atol=1e-6), k
    both["task"].backward()
    for k, v in pred.items():
        assert v.grad is not None and v.grad.abs().sum() > 0, k


def test_camera_loss_weights_last_iteration_most():
    gt = C.normalize_scene(*_scene())
    H, W = gt["depth"].shape[-2:]
    enc = C.vggt_pose_encoding(gt["extrinsics"], gt["intrinsics"], (H, W))
    valid = torch.ones(2, 3, dtype=torch.bool)
    w = L.LossWeights()
    bad_first = L.camera_loss([enc + 0.1, enc], enc, valid, w)["camera"]
    bad_last = L.camera_loss([enc, enc + 0.1], enc, valid, w)["camera"]
    assert torch.all(bad_last > bad_first)


def test_da3_loss_runs_on_its_outputs():
    gt = C.normalize_scene(*_scene())
    B, S, H, W = gt["depth"].shape
    pred = dict(depth=(gt["depth"] * 1.1).requires_grad_(True), depth_conf=torch.ones(B, S, H, W) * 2,
                extrinsics=gt["extrinsics"].clone().requires_grad_(True), intrinsics=gt["intrinsics"])
    out = L.da3_task_loss(pred, gt)
    assert out["camera"].item() < 1e-5 and out["depth_reg"].item() > 0
    out["task"].backward()
    assert pred["depth"].grad.abs().sum() > 0


@pytest.mark.parametrize("q", [0.5, 0.98])
def test_valid_range_drops_the_worst_pixels(q):
    err = torch.arange(1000.0).reshape(1, 1, 10, 100)
    keep = L._quantile_mask(err, torch.ones_like(err, dtype=torch.bool), q)
    assert int(keep.sum()) == int(np.floor(q * 999 + 0.5)) + 1


def test_project_tracks_land_on_the_same_surface_point_and_the_track_loss_is_zero_there():
    """Ground-truth tracks (pretrain --w-track): frame 0 is the query; a visible track lands on a pixel whose world
    point is the query's (to the pixel rounding); the tracking loss of the exact tracks is only the visibility term."""
    from lite3r_backbones.cameras import normalize_scene, project_tracks
    from lite3r_recon.losses import track_loss
    from lite3r_recon.synthetic import render_batch
    from lite3r_recon.train_config import LossWeights

    b = render_batch([5], 3, (56, 70))
    gt = normalize_scene(b["extrinsics"], b["intrinsics"], b["depth"], b["mask"])
    v0, u0 = gt["mask"][0, 0].nonzero()[::7].unbind(-1)
    q = torch.stack([u0, v0], -1)[None]
    xy, vis = project_tracks(q, gt["world_points"], gt["depth"], gt["extrinsics"], gt["intrinsics"], gt["mask"])
    assert torch.allclose(xy[:, 0], q.float(), atol=1e-3) and bool(vis[:, 0].all())
    assert 0 < int(vis[:, 1:].sum()) < vis[:, 1:].numel()  # some points hidden or out of view, some seen
    pts = gt["world_points"][0]
    for s in (1, 2):
        m = vis[0, s]
        u, v = xy[0, s, m].round().long().unbind(-1)
        gap = (pts[s, v, u] - pts[0, v0[m], u0[m]]).norm(dim=-1)
        assert float(gap.median()) < 0.03
    vis_p = vis.float().clamp(0.01, 0.99)
    exact = track_loss([xy], vis_p, xy, vis, LossWeights())
    assert float(exact["track_px"]) == 0.0
    moved = track_loss([xy + 2.0], vis_p, xy, vis, LossWeights())
    assert abs(float(moved["track_px"]) - 2.0) < 1e-5
