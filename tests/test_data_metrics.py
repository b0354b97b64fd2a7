"""recon.metrics on constructed cases with hand-computed answers."""
import math

import numpy as np
import pytest
import torch

from lite3r_backbones.cameras import compose
from lite3r_recon import metrics


def _rot(axis, deg):
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    K = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    th = math.radians(deg)
    return torch.eye(3, dtype=torch.float64) + math.sin(th) * K + (1 - math.cos(th)) * K @ K


def _cams(S=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = []
    for _ in range(S):
        R = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
        R = R * torch.sign(torch.linalg.det(R))
        E.append(torch.cat([R, torch.randn(3, 1, generator=g, dtype=torch.float64)], 1))
    return torch.stack(E)


# ----------------------------------------------------------------------------------------------------- depth
def test_depth_scale_alignment_and_values():
    gt = torch.rand(2, 6, 8) + 0.5
    d = metrics.depth_metrics(3.0 * gt, gt)  # a pure scale error vanishes after alignment
    torch.testing.assert_close(d["abs_rel"], torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(d["delta1"], torch.ones(2))
    torch.testing.assert_close(d["scale"], torch.full((2,), 1 / 3))
    # hand case, no alignment: gt = [1, 2], pred = [1.1, 3] -> abs_rel (0.1 + 0.5)/2, delta1 1/2, rmse sqrt((.01+1)/2)
    gt = torch.tensor([[[1.0, 2.0, 0.0]]])
    pred = torch.tensor([[[1.1, 3.0, 99.0]]])  # the third pixel has gt 0: invalid
    d = metrics.depth_metrics(pred, gt, align=False)
    assert d["abs_rel"].item() == pytest.approx(0.3)
    assert d["delta1"].item() == pytest.approx(0.5)
    assert d["rmse"].item() == pytest.approx(math.sqrt((0.01 + 1.0) / 2), rel=1e-6)
    # aligned: s = (1.1 + 6) / (1.21 + 9)
    s = 7.1 / 10.21
    d = metrics.depth_metrics(pred, gt, torch.tensor([[[True, True, True]]]))
    assert d["scale"].item() == pytest.approx(s, rel=1e-6)
    assert d["abs_rel"].item() == pytest.approx((abs(1.1 * s - 1) + abs(3 * s - 2) / 2) / 2, rel=1e-5)
    assert math.isnan(metrics.depth_metrics(pred, torch.zeros_like(gt))["abs_rel"].item())  # no valid pixel


# ------------------------------------------------------------------------------------------------------ pose
def test_perfect_poses_give_auc_one_and_are_scale_invariant():
    E = _cams(5)
    scaled = torch.cat([E[..., :3], 7.0 * E[..., 3:]], -1)
    m = metrics.pose_metrics(scaled, E)
    for k in ("auc30", "auc15", "auc5", "auc3", "rra3", "rta3"):
        assert m[k].item() == pytest.approx(1.0), k


def test_known_rotation_error_gives_known_rra():
    E = _cams(4)
    bad = E.clone()
    Rerr = _rot([0.3, -1, 0.5], 10.0)  # rotate camera 3 about its centre by 10 degrees
    bad[3, :, :3] = Rerr @ E[3, :, :3]
    bad[3, :, 3] = Rerr @ E[3, :, 3]
    r, t = metrics.relative_pose_errors(bad, E)
    i, j = torch.triu_indices(4, 4, 1)
    involved = (i == 3) | (j == 3)
    torch.testing.assert_close(r[involved], torch.full((3,), 10.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(r[~involved], torch.zeros(3), atol=1e-4, rtol=0)
    m = metrics.pose_metrics(bad, E)
    assert m["rra5"].item() == pytest.approx(0.5) and m["rra15"].item() == pytest.approx(1.0)
    assert m["rra3"].item() == pytest.approx(0.5)


def test_pose_errors_do_not_depend_on_either_world_frame():
    """A raw scene's world is arbitrary and a model's is its first camera: the same cameras written in another world
    (E W for a rigid W, another scale) must score as perfect, and a pose error must read the same in any world
    (`lite3r train`'s table once scored raw scenes against first-camera predictions: AUC 0 for a working teacher)."""
    E = _cams(5, 3)
    W = torch.cat([_rot([1, -2, 0.5], 70.0), torch.tensor([[3.0], [-1.0], [2.0]], dtype=torch.float64)], 1)
    moved = compose(E, W)
    m = metrics.pose_metrics(moved, E)
    for k in ("auc30", "auc3", "rra3", "rta3"):
        assert m[k].item() == pytest.approx(1.0), k
    first = metrics.align_to_first_camera(E)
    torch.testing.assert_close(first[0], torch.eye(3, 4, dtype=torch.float64))
    bad = E.clone()
    bad[2, :, :3] = _rot([0.3, -1, 0.5], 10.0) @ E[2, :, :3]
    r0, t0 = metrics.relative_pose_errors(bad, E)
    r1, t1 = metrics.relative_pose_errors(compose(bad, W), E)
    r2, t2 = metrics.relative_pose_errors(bad, compose(E, W))
    torch.testing.assert_close(r1, r0, atol=1e-4, rtol=0)
    torch.testing.assert_close(r2, r0, atol=1e-4, rtol=0)
    torch.testing.assert_close(t2, t0, atol=1e-3, rtol=0)


def test_translation_direction_is_sign_folded():
    t = torch.tensor([[1.0, 2.0, 3.0]])
    assert metrics.translation_angle(t, -t).item() == pytest.approx(0.0, abs=1e-3)
    assert metrics.translation_angle(t, 5 * t).item() == pytest.approx(0.0, abs=1e-3)
    assert metrics.translation_angle(torch.tensor([[1.0, 0, 0]]), torch.tensor([[0.0, 1, 0]])).item() == \
        pytest.approx(90.0)
    assert metrics.translation_angle(torch.tensor([[1.0, 0, 0]]), torch.tensor([[-1.0, 1, 0]])).item() == \
        pytest.approx(45.0)


def test_auc_matches_hand_and_numpy_histogram():
    e = torch.tensor([0.5, 2.5, 40.0, 3.0])  # 3.0 lies in the closed last bin of [0, 3]
    # bins [0,1): 1, [1,2): 0, [2,3]: 2 -> cumulative /4: [1/4, 1/4, 3/4] -> mean 5/12
    assert metrics.auc(e, 3).item() == pytest.approx(5 / 12)
    x = np.random.default_rng(1).uniform(0, 40, 200)
    hist, _ = np.histogram(x, bins=np.arange(31))
    ref = np.mean(np.cumsum(hist / len(x)))
    assert metrics.auc(torch.tensor(x), 30).item() == pytest.approx(ref, rel=1e-6)
    assert metrics.auc(torch.tensor([float("nan"), 0.0]), 30).item() == pytest.approx(0.5)


def test_pose_metrics_batched():
    E = torch.stack([_cams(3, 0), _cams(3, 1)])
    m = metrics.pose_metrics(E, E)
    assert m["auc30"].shape == (2,) and torch.allclose(m["auc30"], torch.ones(2))


# ----------------------------------------------------------------------------------------------- point cloud
def test_sim3_transformed_cloud_has_zero_chamfer_after_alignment():
    g = torch.Generator().manual_seed(0)
    gt = torch.randn(3000, 3, generator=g, dtype=torch.float64)
    R = _rot([1, 2, 3], 70.0)
    pred = 2.5 * gt @ R.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    s, R2, t = metrics.umeyama(pred, gt)
    assert s.item() == pytest.approx(1 / 2.5)
    m = metrics.pointcloud_metrics(pred, gt, threshold=0.01)
    assert m["chamfer"] < 1e-9 and m["fscore"] == 1.0
    raw = metrics.pointcloud_metrics(pred, gt, align=None)
    assert raw["chamfer"] > 0.5


def test_accuracy_completeness_hand_case():
    gt = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [5.0, 0, 0]])
    pred = torch.tensor([[0.0, 0, 0.1], [1.0, 0, 0]])
    m = metrics.pointcloud_metrics(pred, gt, align=None, threshold=0.5)
    assert m["accuracy"] == pytest.approx(0.05)  # (0.1 + 0) / 2
    assert m["completeness"] == pytest.approx((0.1 + 0 + 4) / 3)
    assert m["chamfer"] == pytest.approx((0.05 + 4.1 / 3) / 2)
    p, r = 1.0, 2 / 3
    assert m["fscore"] == pytest.approx(2 * p * r / (p + r))


def test_summarize_on_a_batch():
    E = torch.stack([_cams(3, 0)]).float()
    gt = torch.rand(1, 3, 4, 5) + 1
    s = metrics.summarize({"extrinsics": E, "depth": 2 * gt}, {"extrinsics": E, "depth": gt, "mask": gt > 0})
    assert s["auc30"] == pytest.approx(1.0) and s["abs_rel"] == pytest.approx(0.0, abs=1e-6)
