"""Cameras + depth -> a coloured world-space point cloud, and the cloud written as PLY / GLB (what `lite3r
reconstruct` writes). Pixel convention: pixel (row v, column u) sits at image coordinates (u, v), as in VGGT's own
unprojection, so the principal point W/2, H/2 of the predicted intrinsics is the image centre."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lite3r_recon.errors import InvalidInput

FORMATS = (".ply", ".glb")


def unproject(depth: Tensor, extrinsics: Tensor, intrinsics: Tensor) -> Tensor:
    """`lite3r_backbones.cameras.unproject_depth` computed in float64 (large scenes, far points), returned float32:
    depth [..., H, W], w2c `extrinsics` [..., 3, 4], `intrinsics` [..., 3, 3] -> world points [..., H, W, 3]."""
    from lite3r_backbones.cameras import unproject_depth

    return unproject_depth(depth.double(), extrinsics.double(), intrinsics.double()).float()


def camera_centers(extrinsics: Tensor) -> Tensor:
    """World positions [..., 3] of w2c cameras [..., 3, 4]: -R^T t."""
    R, t = extrinsics[..., :3, :3].double(), extrinsics[..., :3, 3].double()
    return (-torch.einsum("...ji,...j->...i", R, t)).float()


def confidence_threshold(conf: Tensor, percentile: float) -> float:
    """The `percentile` (0-100) of the finite confidences; points with conf >= it are kept (0: keep all)."""
    if not 0 <= percentile < 100:
        raise InvalidInput(f"--conf-percentile must be in [0, 100), got {percentile}")
    finite = conf[torch.isfinite(conf)].double()
    if finite.numel() == 0 or percentile == 0:
        return float("-inf")
    step = -(-finite.numel() // 16_000_000)  # torch.quantile takes at most 2**24 values: an even subsample
    return float(torch.quantile(finite.flatten()[::step], percentile / 100.0))


def point_cloud(images: Tensor, cams: dict[str, Tensor], conf_percentile: float = 50.0,
                pixels: Tensor | None = None) -> tuple[Tensor, Tensor, list[dict[str, Any]], float]:
    """Coloured world points of one scene.

    images [S,3,H,W] in [0,1]; cams: extrinsics [S,3,4], intrinsics [S,3,3], depth [S,H,W], depth_conf [S,H,W]
    (to_cameras output without the batch axis). Returns (points [N,3] float32, colours [N,3] uint8, per-view stats,
    confidence threshold). A point is kept when its confidence is >= the threshold and it and its depth are finite
    and the depth is positive. `pixels` (bool [S,H,W], load_images' mask): only these pixels count (padding is not
    part of the scene: no points, no statistics, not in the confidence percentile)."""
    depth, conf = cams["depth"].float().cpu(), cams["depth_conf"].float().cpu()
    real = torch.ones_like(depth, dtype=torch.bool) if pixels is None else pixels.cpu()
    if real.shape != depth.shape:
        raise InvalidInput(f"pixel mask is {tuple(real.shape)}, the depth maps are {tuple(depth.shape)}")
    pts = unproject(depth, cams["extrinsics"].cpu(), cams["intrinsics"].cpu())
    thr = confidence_threshold(conf[real], conf_percentile)
    valid = real & torch.isfinite(pts).all(-1) & torch.isfinite(depth) & (depth > 0)
    keep = valid & (conf >= thr)
    colours = (images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    stats = []
    for i in range(depth.shape[0]):
        d = depth[i][valid[i]]
        stats.append({"points_total": int(real[i].sum()), "points_kept": int(keep[i].sum()),
                      "depth_min": float(d.min()) if d.numel() else None,
                      "depth_median": float(d.median()) if d.numel() else None,
                      "depth_max": float(d.max()) if d.numel() else None,
                      "conf_median": float(conf[i][real[i]].median()) if real[i].any() else None})
    return pts[keep], colours[keep], stats, thr


def write_cloud(path: str | os.PathLike, points: Tensor, colours: Tensor, *, overwrite: bool = False) -> Path:
    """PLY (binary) or GLB point cloud with per-vertex RGBA colours, written atomically."""
    import trimesh

    from lite3r_recon.io import atomic_path

    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise InvalidInput(f"--out {path}: expected a .ply or .glb file")
    rgba = torch.cat([colours, torch.full_like(colours[:, :1], 255)], dim=1).numpy()
    cloud = trimesh.PointCloud(points.numpy(), colors=rgba)
    with atomic_path(path, overwrite=overwrite) as tmp:
        if path.suffix.lower() == ".glb":
            trimesh.Scene(cloud).export(str(tmp), file_type="glb")
        else:
            cloud.export(str(tmp), file_type="ply")
    return path
