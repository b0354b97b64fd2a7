"""Geometry task losses for QAT of VGGT and Depth Anything 3 students, after the VGGT paper's training objective.

VGGT (camera + depth + point, as in the official training code's multitask loss):

    L = w_cam * L_camera + w_depth * (L_conf + L_reg + L_grad)(depth) + w_point * (L_conf + L_reg + L_grad)(points)
        + w_track * (L1 of the tracks + BCE of their visibility)       (w_track: 0 unless asked; pretraining uses it)

- camera: L1 on the pose encoding `[t(3), quat xyzw(4), fov_h, fov_w]` of every refinement iteration, weighted
  `gamma ** (n - 1 - i)` (the last iteration weighs 1) and averaged; translation, rotation and field of view weighted
  1 / 1 / 0.5, the translation error clamped at 100.
- depth and points: `gamma * |pred - gt| * conf - alpha * log(conf)` over valid pixels (the aleatoric-uncertainty
  loss), plus the plain error, plus a multi-scale gradient term: L1 of the spatial gradient of the error (depth),
  `1 - cos` between surface normals (points), both confidence-weighted the same way.

Ground truth is put in the frame the network predicts in: frame 0 is the world, the scale is the mean distance of the
valid points to the origin (`normalize_scene`).

Depth Anything 3 returns depth, depth confidence and cameras (extrinsics, intrinsics): the same depth loss, the same
camera loss on the pose encoding of its predicted cameras, and a point loss on its depth unprojected with its cameras.

Every loss is reduced per sample (over that sample's valid pixels / frames) and then averaged over the batch, so a
batch split over DDP ranks gives exactly the gradient of the whole batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lite3r_backbones.cameras import unproject_depth
from lite3r_backbones.cameras import vggt_pose_encoding as pose_encoding
from lite3r_recon.train_config import LossWeights  # noqa: F401  (torch-free: TrainConfig takes its defaults from it)


# --------------------------------------------------------------------------------------------- per-sample losses
def _masked_mean_per_sample(x: Tensor, mask: Tensor) -> Tensor:
    """x, mask [B, ...] -> [B]: mean of x over mask within each sample (0 where a sample has no valid element)."""
    m = mask.to(x.dtype)
    return (x * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)


def _quantile_mask(err: Tensor, mask: Tensor, q: float) -> Tensor:
    """Drop, per sample, the valid elements above the q-quantile of that sample's errors (VGGT's valid_range)."""
    if q <= 0 or q >= 1:
        return mask
    keep = mask.clone()
    e = err.detach().flatten(1)
    mflat = mask.flatten(1)
    for b in range(err.shape[0]):
        vals = e[b][mflat[b]]
        if vals.numel() > 100:
            thresh = vals.float().kthvalue(max(1, int(round(q * (vals.numel() - 1))) + 1)).values
            keep.view(err.shape[0], -1)[b] &= e[b] <= thresh
    return keep


def conf_regression_loss(pred: Tensor, gt: Tensor, mask: Tensor, conf: Tensor, *, gamma: float, alpha: float,
                         valid_range: float = -1) -> tuple[Tensor, Tensor]:
    """pred, gt [B,S,H,W,C], mask/conf [B,S,H,W] -> (conf loss [B], plain L2 error [B]), averaged per sample."""
    err = (pred.float() - gt.float()).norm(dim=-1)
    keep = _quantile_mask(err, mask, valid_range)
    c = conf.float()
    loss_conf = gamma * err * c - alpha * torch.log(c.clamp_min(1e-6))
    return _masked_mean_per_sample(loss_conf, keep), _masked_mean_per_sample(err, keep)


def gradient_loss(pred: Tensor, gt: Tensor, mask: Tensor, conf: Tensor | None, *, gamma: float, alpha: float) -> Tensor:
    """L1 of the spatial gradient of the error, over pixel pairs both valid. [N,H,W,C] -> [N]."""
    m = mask[..., None].to(pred.dtype)
    diff = (pred - gt) * m
    gx = (diff[:, :, 1:] - diff[:, :, :-1]).abs().clamp(max=100) * (m[:, :, 1:] * m[:, :, :-1])
    gy = (diff[:, 1:] - diff[:, :-1]).abs().clamp(max=100) * (m[:, 1:] * m[:, :-1])
    if conf is not None:
        c = conf.clamp_min(1e-6)[..., None].expand_as(diff)
        mx, my = (m[:, :, 1:] * m[:, :, :-1]).expand_as(gx), (m[:, 1:] * m[:, :-1]).expand_as(gy)
        gx = (gamma * gx * c[:, :, 1:] - alpha * torch.log(c[:, :, 1:])) * mx
        gy = (gamma * gy * c[:, 1:] - alpha * torch.log(c[:, 1:])) * my
    n = m.expand_as(diff).flatten(1).sum(1).clamp_min(1)
    return (gx.flatten(1).sum(1) + gy.flatten(1).sum(1)) / n


def _normals(points: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Point map [N,H,W,3] -> 4 cross-product normals [4,N,H,W,3] and their validity [4,N,H,W]."""
    pm = F.pad(mask, (1, 1, 1, 1))
    p = F.pad(points.permute(0, 3, 1, 2), (1, 1, 1, 1)).permute(0, 2, 3, 1)
    c = p[:, 1:-1, 1:-1]
    up, left, down, right = p[:, :-2, 1:-1] - c, p[:, 1:-1, :-2] - c, p[:, 2:, 1:-1] - c, p[:, 1:-1, 2:] - c
    n = torch.stack([torch.cross(up, left, -1), torch.cross(left, down, -1),
                     torch.cross(down, right, -1), torch.cross(right, up, -1)])
    mc = pm[:, 1:-1, 1:-1]
    v = torch.stack([pm[:, :-2, 1:-1] & mc & pm[:, 1:-1, :-2], pm[:, 1:-1, :-2] & mc & pm[:, 2:, 1:-1],
                     pm[:, 2:, 1:-1] & mc & pm[:, 1:-1, 2:], pm[:, 1:-1, 2:] & mc & pm[:, :-2, 1:-1]])
    return F.normalize(n, dim=-1, eps=1e-8), v


def normal_loss(pred: Tensor, gt: Tensor, mask: Tensor, conf: Tensor | None, *, gamma: float, alpha: float) -> Tensor:
    """1 - cos between predicted and true surface normals (4 neighbour pairs). [N,H,W,3] -> [N]."""
    pn, pv = _normals(pred, mask)
    gn, gv = _normals(gt, mask)
    valid = pv & gv
    loss = 1 - (pn * gn).sum(-1).clamp(-1 + 1e-6, 1 - 1e-6)  # [4,N,H,W]
    if conf is not None:
        c = conf.clamp_min(1e-6)[None].expand_as(loss)
        loss = gamma * loss * c - alpha * torch.log(c)
    return _masked_mean_per_sample(loss.transpose(0, 1), valid.transpose(0, 1))


def multiscale(fn, pred: Tensor, gt: Tensor, mask: Tensor, conf: Tensor | None, *, scales: int, **kw) -> Tensor:
    """Average `fn` over `scales` strides 1, 2, 4, ... of [B,S,H,W,C] maps; returns [B]."""
    if scales <= 0:
        return pred.new_zeros(pred.shape[0], dtype=torch.float32)
    B, S = pred.shape[:2]
    flat = lambda t: None if t is None else t.reshape((B * S,) + t.shape[2:])  # noqa: E731
    p, g, m, c = flat(pred.float()), flat(gt.float()), flat(mask), flat(None if conf is None else conf.float())
    total = 0
    for s in range(scales):
        st = 2**s
        total = total + fn(p[:, ::st, ::st], g[:, ::st, ::st], m[:, ::st, ::st],
                           None if c is None else c[:, ::st, ::st], **kw)
    return (total / scales).reshape(B, S).mean(1)


def camera_loss(pose_encs: list[Tensor], gt_enc: Tensor, valid_frames: Tensor, w: LossWeights) -> dict[str, Tensor]:
    """L1 on pose encodings [B,S,9] of each refinement iteration (later ones weigh more) -> per-sample terms [B]."""
    n = len(pose_encs)
    m = valid_frames.float()  # [B,S]
    out = {"T": 0, "R": 0, "FL": 0}
    for i, enc in enumerate(pose_encs):
        wt = w.camera_gamma ** (n - 1 - i)
        d = (enc.float() - gt_enc).abs()
        out["T"] = out["T"] + wt * _masked_mean_per_sample(d[..., :3].clamp(max=100).mean(-1), m)
        out["R"] = out["R"] + wt * _masked_mean_per_sample(d[..., 3:7].mean(-1), m)
        out["FL"] = out["FL"] + wt * _masked_mean_per_sample(d[..., 7:].mean(-1), m)
    out = {k: v / n for k, v in out.items()}
    out["camera"] = w.trans * out["T"] + w.rot * out["R"] + w.focal * out["FL"]
    return out


def track_loss(tracks: list[Tensor], vis: Tensor, gt_tracks: Tensor, gt_vis: Tensor, w: LossWeights
               ) -> dict[str, Tensor]:
    """Tracks [B,S,N,2] of each refinement iteration (pixels), visibility [B,S,N] in (0, 1) vs the ground truth ->
    per-sample terms [B]: L1 of the visible points' pixel error (later iterations weigh more, `track_gamma`) and the
    visibility's binary cross-entropy, over frames 1.. (frame 0 is the query itself)."""
    n = len(tracks)
    m = gt_vis[:, 1:]
    err = 0
    for i, tr in enumerate(tracks):
        d = (tr[:, 1:].float() - gt_tracks[:, 1:]).abs().mean(-1)
        err = err + w.track_gamma ** (n - 1 - i) * _masked_mean_per_sample(d, m)
    # written out: F.binary_cross_entropy refuses to run under CUDA autocast, and the head gives probabilities
    p, t = vis[:, 1:].float().clamp(1e-6, 1 - 1e-6), m.float()
    bce = -(t * p.log() + (1 - t) * (1 - p).log())
    out = {"track_px": err / n, "track_vis": bce.flatten(1).mean(1)}
    out["track"] = out["track_px"] + out["track_vis"]
    return out


def _dense_terms(name: str, pred: Tensor, gt: Tensor, mask: Tensor, conf: Tensor, w: LossWeights, grad_fn) -> dict:
    lc, lr = conf_regression_loss(pred, gt, mask, conf, gamma=w.conf_gamma, alpha=w.conf_alpha,
                                  valid_range=w.valid_range)
    lg = multiscale(grad_fn, pred, gt, mask, conf, scales=w.grad_scales, gamma=w.conf_gamma, alpha=w.conf_alpha)
    return {f"{name}_conf": lc, f"{name}_reg": lr, f"{name}_grad": lg, name: lc + lr + lg}


def _finish(terms: dict[str, Tensor], total: Tensor, sample_ok: Tensor) -> dict[str, Tensor]:
    """Per-sample terms [B] -> batch means; samples without enough valid pixels count as zero (in the graph)."""
    ok = sample_ok.float()
    out = {k: (v * ok).mean() for k, v in terms.items()}
    out["task"] = (total * ok).mean()
    return out


def vggt_task_loss(pred: dict[str, Tensor], gt: dict[str, Tensor], w: LossWeights = LossWeights()) -> dict[str, Tensor]:
    """VGGT's training objective. pred: the model's dict (pose_enc or pose_enc_list, depth [B,S,H,W,1], depth_conf,
    world_points [B,S,H,W,3], world_points_conf; track_list and vis with query points); gt: `normalize_scene`
    output (or a teacher's predictions in the same keys, optionally with its `pose_enc`; tracks [B,S,N,2] and
    track_vis [B,S,N] for the tracking term). Returns scalar terms + "task"."""
    H, W = gt["depth"].shape[-2:]
    mask = gt["mask"]
    sample_ok = mask.flatten(1).sum(1) >= w.min_valid
    terms: dict[str, Tensor] = {}
    total = 0
    encs = pred.get("pose_enc_list") or [pred["pose_enc"]]
    if w.camera:
        gt_enc = gt["pose_enc"].float() if "pose_enc" in gt else pose_encoding(gt["extrinsics"], gt["intrinsics"], (H, W))
        cam = camera_loss(list(encs), gt_enc, mask.flatten(2).sum(2) >= w.min_valid, w)
        terms.update(cam)
        total = total + w.camera * cam["camera"]
    if w.depth and "depth" in pred:
        d = _dense_terms("depth", _chan(pred["depth"]), gt["depth"][..., None], mask, pred["depth_conf"], w,
                         gradient_loss)
        terms.update(d)
        total = total + w.depth * d["depth"]
    if w.point and "world_points" in pred:
        p = _dense_terms("point", pred["world_points"], gt["world_points"], mask, pred["world_points_conf"], w,
                         normal_loss)
        terms.update(p)
        total = total + w.point * p["point"]
    if w.track and "track_list" in pred and "tracks" in gt:
        t = track_loss(pred["track_list"], pred["vis"], gt["tracks"], gt["track_vis"], w)
        terms.update(t)
        total = total + w.track * t["track"]
    return _finish(terms, total, sample_ok)


def da3_task_loss(pred: dict[str, Tensor], gt: dict[str, Tensor], w: LossWeights = LossWeights()) -> dict[str, Tensor]:
    """DA3 adaptation: depth (conf + gradient), camera (pose encoding of its predicted extrinsics/intrinsics), and
    points (its depth unprojected with its cameras, normal term). pred: depth [B,S,H,W] (or [...,1]), depth_conf,
    extrinsics [B,S,3,4], intrinsics [B,S,3,3]."""
    H, W = gt["depth"].shape[-2:]
    mask = gt["mask"]
    sample_ok = mask.flatten(1).sum(1) >= w.min_valid
    depth = _chan(pred["depth"])
    conf = pred.get("depth_conf")
    conf = torch.ones_like(depth[..., 0]) if conf is None else conf
    terms: dict[str, Tensor] = {}
    total = 0
    have_cam = "extrinsics" in pred and "intrinsics" in pred
    if w.camera and have_cam:
        enc = pose_encoding(pred["extrinsics"].float(), pred["intrinsics"].float(), (H, W))
        gt_enc = pose_encoding(gt["extrinsics"], gt["intrinsics"], (H, W))
        cam = camera_loss([enc], gt_enc, mask.flatten(2).sum(2) >= w.min_valid, w)
        terms.update(cam)
        total = total + w.camera * cam["camera"]
    if w.depth:
        d = _dense_terms("depth", depth, gt["depth"][..., None], mask, conf, w, gradient_loss)
        terms.update(d)
        total = total + w.depth * d["depth"]
    if w.point and have_cam:
        pts = unproject_depth(depth[..., 0].float(), pred["extrinsics"].float(), pred["intrinsics"].float())
        p = _dense_terms("point", pts, gt["world_points"], mask, conf, w, normal_loss)
        terms.update(p)
        total = total + w.point * p["point"]
    return _finish(terms, total, sample_ok)


def _chan(depth: Tensor) -> Tensor:
    """Depth [B,S,H,W] or [B,S,H,W,1] -> [B,S,H,W,1]."""
    return depth if depth.dim() == 5 else depth[..., None]


TASK_LOSSES = {"vggt": vggt_task_loss, "da3": da3_task_loss}
