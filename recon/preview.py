"""A preview a person looks at: per-view image, depth and confidence maps, and a top view of the point cloud with
the cameras, in one PNG (matplotlib, Agg).

    write_preview("scene.png", images, depth, conf, points, colours, extrinsics, pixels=mask)

The top view looks down the scene's up direction: people hold cameras upright, so the cameras' x axes are
horizontal and up is the normal of the plane they span (signed like minus the cameras' mean y axis, OpenCV y
pointing down; that mean alone when the x axes do not span a plane), so it works for any world frame (VGGT's
first camera, DA3's, or known poses). At most `max_views` views are shown (evenly picked), at most `max_points`
points drawn.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def top_view_axes(extrinsics: Tensor) -> np.ndarray:
    """[3, 3] rows (right, forward, up) of the plane a top view draws, from w2c cameras [S, 3, 4]."""
    R = extrinsics[:, :, :3].double().numpy()  # rows of R are the camera axes in world coordinates
    up = -R[:, 1].mean(0)
    sv = np.linalg.svd(R[:, 0], full_matrices=True)  # upright cameras: every x axis is horizontal
    if len(R) >= 2 and sv[1][1] > 0.1 * sv[1][0]:  # x axes spread in a plane: up is its normal
        up = sv[2][-1] * (1.0 if sv[2][-1] @ up >= 0 else -1.0)
    up = up / (np.linalg.norm(up) or 1.0)
    right = R[:, 0].mean(0)
    right = right - up * (right @ up)
    if np.linalg.norm(right) < 1e-6:  # cameras disagree wholly: any axis orthogonal to up
        right = np.cross(up, [1.0, 0, 0]) if abs(up[0]) < 0.9 else np.cross(up, [0, 1.0, 0])
    right = right / np.linalg.norm(right)
    return np.stack((right, np.cross(up, right), up))


def _depth_rgb(depth: np.ndarray, valid: np.ndarray, cmap) -> np.ndarray:
    out = np.ones(depth.shape + (3,))
    if valid.any():
        lo, hi = np.percentile(depth[valid], [2, 98])
        rgb = cmap(np.clip((depth - lo) / max(hi - lo, 1e-9), 0, 1))[..., :3]
        out[valid] = rgb[valid]
    return out


def write_preview(path: str | os.PathLike, images: Tensor, depth: Tensor, conf: Tensor, points: Tensor,
                  colours: Tensor, extrinsics: Tensor, *, pixels: Tensor | None = None, title: str = "",
                  max_views: int = 6, max_points: int = 60_000, overwrite: bool = False) -> Path:
    """images [S,3,H,W] in [0,1], depth / conf [S,H,W], points [N,3] with colours [N,3] uint8, w2c extrinsics
    [S,3,4], pixels: bool [S,H,W] of real (not padding) pixels. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from lite3r_recon.io import atomic_path
    from lite3r_recon.video import keep_evenly

    path = Path(path)
    S = images.shape[0]
    views = keep_evenly(S, max_views)
    real = torch.ones_like(depth, dtype=torch.bool) if pixels is None else pixels.bool()
    dep, cf = depth.float().cpu().numpy(), conf.float().cpu().numpy()
    valid = real.cpu().numpy() & np.isfinite(dep) & (dep > 0)
    fig = plt.figure(figsize=(12, 2.2 * len(views) + 0.6), dpi=100)
    grid = fig.add_gridspec(len(views), 5, width_ratios=(1, 1, 1, 0.15, 2.6))
    for row, i in enumerate(views):
        axes = [fig.add_subplot(grid[row, c]) for c in range(3)]
        axes[0].imshow(images[i].float().cpu().clamp(0, 1).permute(1, 2, 0).numpy())
        axes[1].imshow(_depth_rgb(dep[i], valid[i], plt.get_cmap("turbo")))
        c = np.where(real[i].cpu().numpy(), cf[i], np.nan)
        axes[2].imshow(c, cmap="magma")
        for ax, name in zip(axes, (f"view {i}", "depth", "confidence")):
            ax.set_axis_off()
            if row == 0 or name.startswith("view"):
                ax.set_title(name, fontsize=8)
    ax = fig.add_subplot(grid[:, 4])
    axes3 = top_view_axes(extrinsics.cpu())
    pts = points.double().cpu().numpy()
    col = colours.cpu().numpy()
    if len(pts) > max_points:
        pick = np.random.default_rng(0).choice(len(pts), max_points, replace=False)
        pts, col = pts[pick], col[pick]
    xy = pts @ axes3[:2].T
    ax.scatter(xy[:, 0], xy[:, 1], c=col / 255.0, s=0.5, linewidths=0, rasterized=True)
    R = extrinsics[:, :, :3].double().cpu().numpy()
    t = extrinsics[:, :, 3].double().cpu().numpy()
    centres = -np.einsum("sji,sj->si", R, t) @ axes3[:2].T
    forward = R[:, 2] @ axes3[:2].T
    span = np.ptp(np.concatenate([xy, centres]), axis=0).max() if len(xy) else np.ptp(centres, axis=0).max()
    arrow = 0.08 * (span if span > 0 else 1.0)
    ax.quiver(centres[:, 0], centres[:, 1], forward[:, 0], forward[:, 1], color="crimson", angles="xy",
              scale_units="xy", scale=1.0 / arrow, width=0.004)
    ax.scatter(centres[:, 0], centres[:, 1], c="crimson", s=14, zorder=3)
    for i, (x, y) in enumerate(centres):
        ax.annotate(str(i), (x, y), fontsize=7, color="crimson", xytext=(3, 3), textcoords="offset points")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(f"top view: {len(points):,} points, {S} cameras", fontsize=9)
    ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


__all__ = ["top_view_axes", "write_preview"]
