"""One model on one scene -> the field's metrics (depth, pose, point cloud): what `lite3r eval`, `lite3r study` and
`lite3r pretrain` report. The sample is normalised the way the field does (frame 0 = world, unit mean distance of
valid points to it); the point clouds are predicted depth unprojected with the predicted cameras vs GT depth with GT
cameras, aligned by Sim(3) on pixel correspondences, then subsampled to `max_points` each for the KD-tree search."""
from __future__ import annotations

import math

import numpy as np
import torch

HELDOUT = 2**31  # held-out synthetic scene k has seed HELDOUT + k; training scenes (pretrain, train) are below it

GROUPS = {
    "depth": ("abs_rel", "delta1", "rmse"),
    "pose": ("auc30", "auc15", "auc5", "auc3", "rot_err", "trans_err"),
    "pose accuracy": ("rra30", "rta30", "rra15", "rta15", "rra5", "rta5", "rra3", "rta3"),
    "points": ("accuracy", "completeness", "chamfer", "fscore"),
}

def _points(depth, extrinsics, intrinsics):
    from lite3r_backbones.cameras import unproject_depth

    return unproject_depth(depth[None].double(), extrinsics[None].double(), intrinsics[None].double())[0]


def evaluate_sample(model: torch.nn.Module, sample: dict, *, device: str | torch.device = "cpu",
                    threshold: float = 0.05, max_points: int = 20000, seed: int = 0) -> dict[str, float]:
    """Metrics of `model` on one normalised sample (datasets.*.sample(..., normalize=True))."""
    from lite3r_backbones import to_cameras
    from lite3r_recon import metrics

    images = sample["images"].to(device)
    hw = tuple(images.shape[-2:])
    with torch.inference_mode():
        out = model(images[None])
    out = {k: (v.float().cpu() if torch.is_tensor(v) else v) for k, v in out.items()}
    cams = {k: v[0] for k, v in to_cameras(getattr(model, "name", None) or model, out, hw).items()}
    row: dict[str, float] = {}
    mask = sample["mask"]
    if len(images) >= 2:
        row.update({k: float(v) for k, v in metrics.pose_metrics(cams["extrinsics"], sample["extrinsics"]).items()})
    if mask.any():
        dm = metrics.depth_metrics(cams["depth"], sample["depth"], mask)
        row.update({k: float(np.nanmean(dm[k].numpy())) for k in ("abs_rel", "delta1", "rmse")})
        pred_pts = _points(cams["depth"], cams["extrinsics"], cams["intrinsics"])[mask]
        gt_pts = _points(sample["depth"], sample["extrinsics"], sample["intrinsics"])[mask]
        ok = torch.isfinite(pred_pts).all(-1)
        pred_pts, gt_pts = pred_pts[ok], gt_pts[ok]
        if len(gt_pts) >= 3:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(len(gt_pts), generator=g)[:max_points]
            pc = metrics.pointcloud_metrics(pred_pts[idx], gt_pts[idx], threshold=threshold)
            row.update({k: pc[k] for k in GROUPS["points"]})
    return row


# ------------------------------------------------------------------------------- the held-out synthetic split
def heldout_seeds(n: int) -> list[int]:
    return [HELDOUT + k for k in range(n)]


def heldout_data(n: int, size: tuple[int, int], device=None):
    """The held-out synthetic scenes as a dataset (datasets.SyntheticScenes: scene k is seed HELDOUT + k), ray cast
    on `device` and kept once rendered: training scores them every few hundred steps, and casting 16 views of
    252x252 on a busy CPU takes longer than a GPU's training step by far."""
    from lite3r_recon.datasets import SyntheticScenes

    return SyntheticScenes(n, size, HELDOUT, device=device, keep=True)


@torch.no_grad()
def heldout_metrics(model: torch.nn.Module, data, *, device, scenes: int | None = None, views: int = 4,
                    points: bool = True) -> dict[str, float]:
    """Mean metrics (lite3r eval's: pose, depth, points) of `model` over the first `scenes` scenes of `data`."""
    import numpy as np

    from lite3r_recon.scoring import evaluate_sample

    was = model.training
    model.eval()
    rows = []
    for i in range(min(len(data), scenes or len(data))):
        sample = data.sample(i, views=views, rng=None, normalize=True)
        rows.append(evaluate_sample(model, sample, device=device, max_points=20000 if points else 3))
    model.train(was)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: float(np.nanmean([r.get(k, math.nan) for r in rows])) for k in keys}
