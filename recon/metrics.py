"""Depth, pose and point-cloud metrics with the protocols the field reports (pure functions, batched torch).

- depth_metrics: per-image least-squares scale on valid pixels, then AbsRel, delta < 1.25, RMSE.
- pose_metrics (VGGT / DA3 protocol): both sets of cameras aligned to their first camera (so the world frame of
  either does not matter), then all pairs i < j; relative rotation error (degrees) and relative translation
  direction error min(theta, 180 - theta); RRA@k / RTA@k; AUC@T = mean of the cumulative histogram of
  max(rot_err, trans_err) in 1-degree bins over [0, T].
- pointcloud_metrics: Umeyama Sim(3) alignment, then accuracy (pred -> GT mean nearest-neighbour distance),
  completeness (GT -> pred), Chamfer (their mean) and F-score at a threshold; nearest neighbours by scipy's cKDTree.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from lite3r_backbones.cameras import compose, se3_inverse
from lite3r_recon.errors import InvalidInput

AUC_THRESHOLDS = (30, 15, 5, 3)
ACC_THRESHOLDS = (30, 15, 5, 3)


# ------------------------------------------------------------------------------------------------------ depth
def depth_metrics(pred: Tensor, gt: Tensor, mask: Tensor | None = None, *, align: bool = True) -> dict[str, Tensor]:
    """pred, gt [N,H,W] (or [..., H, W]), mask bool (default gt > 0) -> per-image tensors [N]: abs_rel, delta1,
    rmse, scale (the least-squares s minimising |s * pred - gt|^2 on valid pixels; 1 when align=False).
    Images without a valid pixel give NaN."""
    pred, gt = pred.double(), gt.double()
    lead = pred.shape[:-2]
    pred, gt = pred.reshape(-1, *pred.shape[-2:]), gt.reshape(-1, *gt.shape[-2:])
    m = (gt > 0) & torch.isfinite(gt) & torch.isfinite(pred)
    if mask is not None:
        m = m & mask.reshape(m.shape).bool()
    mf = m.double()
    p, g = torch.where(m, pred, 0.0), torch.where(m, gt, 1.0)
    n = mf.flatten(1).sum(1)
    if align:
        s = (p * g * mf).flatten(1).sum(1) / (p * p * mf).flatten(1).sum(1).clamp_min(1e-30)
    else:
        s = torch.ones_like(n)
    a = p * s[:, None, None]
    mean = lambda x: (x * mf).flatten(1).sum(1) / n  # noqa: E731  (NaN where n == 0)
    ratio = torch.maximum(a / g, g / a.clamp_min(1e-30))
    out = {"abs_rel": mean((a - g).abs() / g), "delta1": mean((ratio < 1.25).double()),
           "rmse": mean((a - g) ** 2).sqrt(), "scale": s}
    return {k: v.reshape(lead).float() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------------- pose
def rotation_angle(R1: Tensor, R2: Tensor) -> Tensor:
    """Angle in degrees of R1^T R2 (the geodesic distance), [..., 3, 3] -> [...]; stable near 0 and 180."""
    Rr = R1.transpose(-1, -2) @ R2
    skew = torch.stack([Rr[..., 2, 1] - Rr[..., 1, 2], Rr[..., 0, 2] - Rr[..., 2, 0], Rr[..., 1, 0] - Rr[..., 0, 1]], -1)
    tr = Rr[..., 0, 0] + Rr[..., 1, 1] + Rr[..., 2, 2]
    return torch.rad2deg(torch.atan2(skew.norm(dim=-1), tr - 1))


def translation_angle(t1: Tensor, t2: Tensor, eps: float = 1e-15) -> Tensor:
    """Direction error in degrees between translations [..., 3], folded: min(theta, 180 - theta); a zero
    translation gives 90 (no direction)."""
    t1, t2 = t1.double(), t2.double()
    theta = torch.rad2deg(torch.atan2(torch.linalg.cross(t1, t2).norm(dim=-1), (t1 * t2).sum(-1)))  # exact near 0, 180
    theta = torch.where((t1.norm(dim=-1) > eps) & (t2.norm(dim=-1) > eps), theta, torch.full_like(theta, 90.0))
    return torch.minimum(theta, 180.0 - theta)


def align_to_first_camera(E: Tensor) -> Tensor:
    """World-to-camera extrinsics [..., S, 3, 4] re-expressed with the first camera's frame as the world."""
    return compose(E, se3_inverse(E[..., :1, :, :]).expand_as(E))


def relative_pose_errors(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """Extrinsics [..., S, 3, 4] (or 4x4) world-to-camera -> (rotation errors, translation direction errors) in
    degrees [..., S*(S-1)/2] over all pairs i < j of the relative pose E_i^-1 E_j, each set first aligned to its
    first camera (E_k E_0^-1): E_i^-1 E_j is written in the world frame, so without the alignment the ground
    truth's arbitrary world (a raw scene's) and the model's (its first camera) would not compare."""
    pred, gt = align_to_first_camera(pred[..., :3, :4].double()), align_to_first_camera(gt[..., :3, :4].double())
    S = pred.shape[-3]
    i, j = torch.triu_indices(S, S, 1)

    def rel(E):
        Ei = se3_inverse(E[..., i, :, :])
        Ej = E[..., j, :, :]
        R = Ei[..., :3, :3] @ Ej[..., :3, :3]
        t = (Ei[..., :3, :3] @ Ej[..., :3, 3:] + Ei[..., :3, 3:])[..., 0]
        return R, t

    Rp, tp = rel(pred)
    Rg, tg = rel(gt)
    return rotation_angle(Rp, Rg).float(), translation_angle(tp, tg).float()


def auc(errors: Tensor, max_threshold: int = 30) -> Tensor:
    """Mean of the cumulative histogram of `errors` [..., P] (degrees) in 1-degree bins over [0, max_threshold]
    (the last bin closed, like np.histogram); errors above the range or NaN count as misses -> [...]."""
    P = errors.shape[-1]
    e = torch.nan_to_num(errors.double(), nan=math.inf)
    inside = (e >= 0) & (e <= max_threshold)
    idx = e.clamp(0, max_threshold).floor().long().clamp_max(max_threshold - 1)
    hist = torch.zeros(*e.shape[:-1], max_threshold, dtype=torch.float64, device=e.device)
    hist.scatter_add_(-1, idx, inside.double())
    return (hist.cumsum(-1) / max(P, 1)).mean(-1).float()


def pose_metrics(pred: Tensor, gt: Tensor, *, thresholds=ACC_THRESHOLDS, auc_thresholds=AUC_THRESHOLDS
                 ) -> dict[str, Tensor]:
    """pred, gt extrinsics [..., S, 3, 4] w2c (S >= 2) -> rra{k}, rta{k} (fraction of pairs under k degrees),
    auc{T}, and the mean errors rot_err / trans_err, each a tensor of shape [...]."""
    if pred.shape[-3] < 2:
        raise InvalidInput(f"pose metrics need at least 2 views, got {pred.shape[-3]}")
    r, t = relative_pose_errors(pred, gt)
    out: dict[str, Tensor] = {}
    for k in thresholds:
        out[f"rra{k}"] = (r < k).float().mean(-1)
        out[f"rta{k}"] = (t < k).float().mean(-1)
    m = torch.maximum(r, t)
    for T in auc_thresholds:
        out[f"auc{T}"] = auc(m, T)
    out["rot_err"], out["trans_err"] = r.mean(-1), t.mean(-1)
    return out


# -------------------------------------------------------------------------------------------- point clouds
def umeyama(src: Tensor, dst: Tensor, *, with_scale: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares Sim(3) (s, R, t) with dst ~ s R src + t; src, dst [N,3] corresponding points (N >= 3)."""
    src, dst = src.double(), dst.double()
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / src.shape[0]
    U, D, Vt = torch.linalg.svd(cov)
    Sg = torch.ones(3, dtype=torch.float64, device=src.device)
    if torch.linalg.det(U) * torch.linalg.det(Vt) < 0:
        Sg[2] = -1
    R = U @ torch.diag(Sg) @ Vt
    var = (xs ** 2).sum() / src.shape[0]
    s = (D * Sg).sum() / var.clamp_min(1e-30) if with_scale else torch.ones((), dtype=torch.float64)
    t = mu_d - s * R @ mu_s
    return s, R, t


def apply_sim3(points: Tensor, s: Tensor, R: Tensor, t: Tensor) -> Tensor:
    return (s * points.double() @ R.T + t).to(points.dtype)


def nn_distances(query: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> np.ndarray:
    """Distance from each query point [N,3] to its nearest point of ref [M,3] (scipy cKDTree, no N x M matrix)."""
    from scipy.spatial import cKDTree

    q = np.asarray(query.detach().cpu().double() if torch.is_tensor(query) else query, dtype=np.float64)
    r = np.asarray(ref.detach().cpu().double() if torch.is_tensor(ref) else ref, dtype=np.float64)
    if len(q) == 0 or len(r) == 0:
        return np.full(len(q), np.inf)
    return cKDTree(r).query(q, k=1, workers=-1)[0]


def pointcloud_metrics(pred: Tensor, gt: Tensor, *, threshold: float = 0.05, align: str | None = "points",
                       pred_align: Tensor | None = None, gt_align: Tensor | None = None) -> dict[str, float]:
    """Accuracy, completeness, Chamfer and F-score of pred [N,3] vs gt [M,3].

    align: "points" (Sim(3) from `pred_align` -> `gt_align` correspondences, default pred -> gt, which then must
    have the same length), None (no alignment). Pass camera centres as pred_align / gt_align to align on
    cameras. `threshold` is in GT units (for F-score, precision and recall)."""
    pred, gt = pred.reshape(-1, 3).double(), gt.reshape(-1, 3).double()
    if align is not None:
        a = pred if pred_align is None else pred_align.reshape(-1, 3)
        b = gt if gt_align is None else gt_align.reshape(-1, 3)
        if a.shape != b.shape or a.shape[0] < 3:
            raise InvalidInput(f"Sim(3) alignment needs >= 3 corresponding points, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
        s, R, t = umeyama(a, b)
        pred = apply_sim3(pred, s, R, t)
    d_pg = nn_distances(pred, gt)
    d_gp = nn_distances(gt, pred)
    acc, comp = float(d_pg.mean()), float(d_gp.mean())
    precision, recall = float((d_pg < threshold).mean()), float((d_gp < threshold).mean())
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"accuracy": acc, "completeness": comp, "chamfer": 0.5 * (acc + comp), "precision": precision,
            "recall": recall, "fscore": f}


# ---------------------------------------------------------------------------------------------- summaries
def _nanmean(x: Tensor) -> float:
    x = x.float()
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else float("nan")


def summarize(cams: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, float]:
    """Predicted cameras/depth (backbones.to_cameras: extrinsics [B,S,3,4], depth [B,S,H,W]) vs a batch (extrinsics,
    depth, mask) -> mean depth metrics (abs_rel, delta1, rmse) and pose metrics (auc30 ... , rra/rta)."""
    out: dict[str, float] = {}
    if "depth" in batch and "depth" in cams:
        pd, gd = cams["depth"].float(), batch["depth"].float().to(cams["depth"].device)
        if pd.dim() == gd.dim() + 1:
            pd = pd[..., 0]
        mask = batch.get("mask")
        dm = depth_metrics(pd.flatten(0, 1), gd.flatten(0, 1),
                           None if mask is None else mask.to(pd.device).flatten(0, 1))
        out.update({k: _nanmean(dm[k]) for k in ("abs_rel", "delta1", "rmse")})
    if cams["extrinsics"].shape[-3] >= 2:
        pm = pose_metrics(cams["extrinsics"].float().cpu(), batch["extrinsics"].float().cpu())
        out.update({k: _nanmean(v) for k, v in pm.items()})
    return out


__all__ = ["align_to_first_camera", "apply_sim3", "auc", "depth_metrics", "nn_distances", "pointcloud_metrics",
           "pose_metrics", "relative_pose_errors", "rotation_angle", "summarize", "translation_angle", "umeyama"]
