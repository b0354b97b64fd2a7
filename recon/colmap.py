"""COLMAP sparse models (cameras, images, points3D) of a reconstruction, for NeRF / Gaussian-splatting tools and
bundle adjustment, read and written through pycolmap.

    scene = ColmapScene(names, sizes, extrinsics, intrinsics, points, colours, obs_point, obs_view, obs_xy)
    write_colmap("sparse/0", scene, binary=True, bundle_adjust=False)    # pycolmap.Reconstruction("sparse/0")

Conventions. Inputs are lite3r's: world-to-camera [R|t] with OpenCV axes (COLMAP's too), pixel intrinsics and
2D observations with pixel centres at integer coordinates, all for the ORIGINAL image of each view (see
``model_to_original``: the network ran on a resized, cropped or padded copy). COLMAP puts pixel centres at +0.5,
so the writer adds 0.5 to principal points and observations. One PINHOLE camera per image (ids 1..S, the image's
index + 1); point ids are the point's index + 1.

The model is first written in COLMAP's documented text format into a temporary folder beside the destination,
read back by pycolmap (which checks it), bundle-adjusted there when asked, and written out by pycolmap (binary:
cameras.bin, images.bin, points3D.bin and pycolmap's rigs / frames; or text); the files are moved into place one by
one, so an existing model is replaced only with ``overwrite``.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lite3r_recon.errors import InvalidInput, MissingInput, WouldOverwrite
from lite3r_recon.io import check_writable, writing

MODEL_FILES = ("cameras", "images", "points3D", "rigs", "frames")


# ------------------------------------------------------------------------------------------------ pixel maps
def model_to_original(pixel_map: Tensor, K_model: Tensor) -> Tensor:
    """Intrinsics [..., 3, 3] of the network's image -> those of the original image. `pixel_map` [..., 3, 3] maps
    original pixels to network pixels, x_net = A x_orig (homogeneous): what ``load_images`` returns as the
    intrinsics when given the identity for every view."""
    return torch.linalg.solve(pixel_map.double(), K_model.double())


def points_to_original(pixel_map: Tensor, xy: Tensor) -> Tensor:
    """Network pixels xy [S, ..., 2] of view s -> original pixels, with pixel_map [S, 3, 3] as above."""
    A = pixel_map.double()
    scale = torch.stack((A[:, 0, 0], A[:, 1, 1]), -1)
    shift = A[:, :2, 2]
    shape = (A.shape[0],) + (1,) * (xy.ndim - 2) + (2,)
    return (xy.double() - shift.reshape(shape)) / scale.reshape(shape)


# ------------------------------------------------------------------------------------------------ the scene
@dataclasses.dataclass
class ColmapScene:
    """What a COLMAP model holds, in lite3r's conventions (see the module docstring).

    names: image file names (S); sizes: (width, height) of each original image; extrinsics [S, 3, 4] w2c;
    intrinsics [S, 3, 3] (original pixels); points [N, 3]; colours [N, 3] uint8; observations as three aligned
    arrays: obs_point [M] (point index), obs_view [M] (view index), obs_xy [M, 2] (original pixels).
    """

    names: list[str]
    sizes: list[tuple[int, int]]
    extrinsics: Tensor
    intrinsics: Tensor
    points: Tensor
    colours: Tensor
    obs_point: Tensor
    obs_view: Tensor
    obs_xy: Tensor

    def __post_init__(self) -> None:
        S, N, M = len(self.names), self.points.shape[0], self.obs_point.shape[0]
        checks = [
            (len(self.sizes) == S, f"sizes: {len(self.sizes)} for {S} images"),
            (tuple(self.extrinsics.shape) == (S, 3, 4),
             f"extrinsics {tuple(self.extrinsics.shape)}, expected ({S}, 3, 4)"),
            (tuple(self.intrinsics.shape) == (S, 3, 3),
             f"intrinsics {tuple(self.intrinsics.shape)}, expected ({S}, 3, 3)"),
            (self.points.ndim == 2 and self.points.shape[1] == 3,
             f"points {tuple(self.points.shape)}, expected [N, 3]"),
            (tuple(self.colours.shape) == (N, 3), f"colours {tuple(self.colours.shape)}, expected ({N}, 3)"),
            (self.obs_view.shape == (M,) and tuple(self.obs_xy.shape) == (M, 2),
             f"observations: {M} points, {tuple(self.obs_view.shape)} views, {tuple(self.obs_xy.shape)} pixels"),
            (M == 0 or (int(self.obs_point.min()) >= 0 and int(self.obs_point.max()) < N), "obs_point out of range"),
            (M == 0 or (int(self.obs_view.min()) >= 0 and int(self.obs_view.max()) < S), "obs_view out of range"),
            (len(set(self.names)) == S, "image names must be unique"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidInput(f"COLMAP scene: {msg}")
        K, E = self.intrinsics.double(), self.extrinsics.double()
        bad = ~(torch.isfinite(K).all((1, 2)) & (K[:, 0, 0] > 0) & (K[:, 1, 1] > 0) & torch.isfinite(E).all((1, 2)))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise InvalidInput(f"COLMAP scene: view {i} ({self.names[i]}) has no usable camera (fx "
                               f"{float(K[i, 0, 0]):.4g}, fy {float(K[i, 1, 1]):.4g}: a degenerate prediction; "
                               f"give --intrinsics)")


def grid_queries(pixels: Tensor, n: int) -> Tensor:
    """About `n` query points [Q, 2] (x, y integer pixels) on a regular grid over the True pixels of `pixels` [H, W]
    (frame 0's real pixels), for the tracking head."""
    H, W = pixels.shape
    real = int(pixels.sum())
    if n < 1 or real == 0:
        return torch.zeros(0, 2)
    step = max(1, int((real / n) ** 0.5))
    ys, xs = torch.meshgrid(torch.arange(step // 2, H, step), torch.arange(step // 2, W, step), indexing="ij")
    xy = torch.stack((xs.reshape(-1), ys.reshape(-1)), -1)
    xy = xy[pixels[xy[:, 1], xy[:, 0]]]
    return xy[torch.linspace(0, len(xy) - 1, min(n, len(xy))).round().long()].float()


def scene_from_prediction(names: list[str], sizes: list[tuple[int, int]], pixel_map: Tensor, images: Tensor,
                          cams: dict[str, Tensor], keep: Tensor, *, max_points: int = 100_000,
                          tracks: dict[str, Tensor] | None = None, min_visibility: float = 0.2) -> ColmapScene:
    """A ColmapScene of one prediction, geometry taken back to the original images through `pixel_map` [S,3,3]
    (original -> network pixels, see `model_to_original`).

    images [S,3,H,W] in [0,1]; cams: extrinsics [S,3,4], intrinsics [S,3,3] (network pixels), depth [S,H,W].
    Without `tracks`: the pixels of `keep` [S,H,W] (at most `max_points`, evenly spread), each a point seen once,
    where it was predicted. With `tracks` {"query" [Q,2], "track" [S,Q,2], "vis" [S,Q], "conf" [S,Q]} (network
    pixels, frame 0's queries): one point per query whose frame-0 pixel is in `keep`, at frame 0's unprojected depth,
    observed in every view where its visibility is >= `min_visibility` (the official demo's 0.2) and the track is
    inside the image."""
    from lite3r_recon.pointcloud import unproject

    S, H, W = cams["depth"].shape
    world = unproject(cams["depth"], cams["extrinsics"], cams["intrinsics"])  # [S, H, W, 3]
    rgb = (images.float().clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    if tracks is None:
        idx = keep.nonzero()  # [M, 3] (view, row, col)
        if len(idx) > max_points:
            idx = idx[torch.linspace(0, len(idx) - 1, max_points).round().long()]
        v, r, c = idx.unbind(-1)
        obs_xy = points_to_original(pixel_map[v], torch.stack((c, r), -1))
        points, colours = world[v, r, c], rgb[v, r, c]
        obs_point, obs_view = torch.arange(len(idx)), v
    else:
        q = tracks["query"].round().long()
        good = keep[0, q[:, 1], q[:, 0]]
        q = q[good]
        xy = tracks["track"][:, good].double()  # [S, Q, 2]
        score = tracks["vis"][:, good]
        inside = (xy[..., 0] >= -0.5) & (xy[..., 0] <= W - 0.5) & (xy[..., 1] >= -0.5) & (xy[..., 1] <= H - 0.5)
        seen = (score >= min_visibility) & inside
        seen[0] = True  # the query itself
        multi = seen.sum(0) >= 2  # a point seen once is a dense point, not a track
        q, xy, seen = q[multi], xy[:, multi], seen[:, multi]
        points, colours = world[0, q[:, 1], q[:, 0]], rgb[0, q[:, 1], q[:, 0]]
        obs_view, obs_point = seen.nonzero().unbind(-1)
        obs_xy = points_to_original(pixel_map, xy)[obs_view, obs_point]
    K = model_to_original(pixel_map, cams["intrinsics"]).float()
    return ColmapScene(names=[Path(n).name for n in names], sizes=list(sizes), extrinsics=cams["extrinsics"].float(),
                       intrinsics=K, points=points.float(), colours=colours, obs_point=obs_point.long(),
                       obs_view=obs_view.long(), obs_xy=obs_xy.float())


def rotation_to_quaternion_wxyz(R: np.ndarray) -> np.ndarray:
    """Rotation matrices [S, 3, 3] -> unit quaternions (w, x, y, z) with w >= 0 (COLMAP's order)."""
    from scipy.spatial.transform import Rotation

    xyzw = Rotation.from_matrix(R).as_quat()
    wxyz = np.concatenate((xyzw[:, 3:], xyzw[:, :3]), axis=1)
    return np.where(wxyz[:, :1] < 0, -wxyz, wxyz)


def colmap_text(scene: ColmapScene) -> dict[str, str]:
    """The three files of COLMAP's text format: {"cameras.txt": ..., "images.txt": ..., "points3D.txt": ...}."""
    K = scene.intrinsics.double().numpy()
    E = scene.extrinsics.double().numpy()
    q = rotation_to_quaternion_wxyz(E[:, :, :3])
    obs_point = scene.obs_point.long().numpy()
    obs_view = scene.obs_view.long().numpy()
    obs_xy = scene.obs_xy.double().numpy() + 0.5  # COLMAP: pixel centres at +0.5
    cams = ["# CAMERA_ID MODEL WIDTH HEIGHT fx fy cx cy"]
    images = ["# IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME, then X Y POINT3D_ID per observation"]
    index_in_view = np.zeros(len(obs_point), dtype=np.int64)
    for i, (name, (w, h)) in enumerate(zip(scene.names, scene.sizes)):
        fx, fy, cx, cy = (float(v) for v in (K[i, 0, 0], K[i, 1, 1], K[i, 0, 2] + 0.5, K[i, 1, 2] + 0.5))
        cams.append(f"{i + 1} PINHOLE {int(w)} {int(h)} {fx!r} {fy!r} {cx!r} {cy!r}")
        if any(c in name for c in " \n\t"):
            raise InvalidInput(f"COLMAP image name {name!r}: no whitespace allowed")
        images.append(" ".join([str(i + 1), *map(repr, q[i].tolist()), *map(repr, E[i, :, 3].tolist()), str(i + 1),
                                name]))
        mine = np.flatnonzero(obs_view == i)
        index_in_view[mine] = np.arange(len(mine))
        pairs = zip(obs_xy[mine].tolist(), obs_point[mine].tolist())
        images.append(" ".join(f"{x!r} {y!r} {p + 1}" for (x, y), p in pairs))
    order = np.argsort(obs_point, kind="stable")
    starts = np.searchsorted(obs_point[order], np.arange(len(scene.points) + 1))
    pts = scene.points.double().numpy()
    col = scene.colours.to(torch.uint8).numpy()
    lines = ["# POINT3D_ID X Y Z R G B ERROR TRACK[] as (IMAGE_ID, POINT2D_IDX)"]
    for p in range(len(pts)):
        track = order[starts[p]:starts[p + 1]]
        lines.append(" ".join([str(p + 1), *map(repr, pts[p].tolist()), *map(str, col[p].tolist()), "0"]
                              + [f"{v + 1} {j}" for v, j in zip(obs_view[track].tolist(),
                                                                index_in_view[track].tolist())]))
    return {"cameras.txt": "\n".join(cams) + "\n", "images.txt": "\n".join(images) + "\n",
            "points3D.txt": "\n".join(lines) + "\n"}


def check_destination(out: Path, overwrite: bool) -> None:
    """A one-line error unless `out` can take a COLMAP model (absent, or a folder without one, or `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--colmap {out}: exists and is not a folder")
    check_writable(out, folder=True)
    if out.is_dir() and not overwrite:
        present = sorted(p.name for p in out.iterdir() if p.stem in MODEL_FILES and p.suffix in (".bin", ".txt"))
        if present:
            raise WouldOverwrite(f"--colmap {out}: holds a COLMAP model ({', '.join(present)}); pass --overwrite "
                                  f"to replace it")


def write_colmap(out: str | os.PathLike, scene: ColmapScene, *, binary: bool = True, bundle_adjust: bool = False,
                 refine_focal_length: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Write `scene` as a COLMAP model in folder `out` (created; its parent must exist). With `bundle_adjust`,
    pycolmap jointly refines the poses, the points (and the focal lengths unless `refine_focal_length` is False)
    first, after dropping the points observed in fewer than 2 views (unconstrained). Returns counts and the mean
    reprojection error (pixels) before and after."""
    import pycolmap

    out = Path(out)
    check_destination(out, overwrite)
    if not out.parent.is_dir():
        raise MissingInput(f"--colmap {out}: the folder {out.parent} does not exist")
    with writing(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with writing(out):
            for name, text in colmap_text(scene).items():
                (tmp / name).write_text(text)
        try:
            rec = pycolmap.Reconstruction(str(tmp))
        except ValueError as e:  # pycolmap's checks (e.g. camera parameters) as one line
            raise InvalidInput(f"--colmap {out}: pycolmap refused the model ({str(e).splitlines()[0]})") from None
        rec.update_point_3d_errors()  # the text holds 0: measure them
        summary: dict[str, Any] = {"images": rec.num_images(), "points3D": rec.num_points3D(),
                                   "observations": int(scene.obs_point.shape[0]),
                                   "reprojection_error_px": rec.compute_mean_reprojection_error()}
        if bundle_adjust:
            if scene.obs_point.shape[0] == 0:
                raise InvalidInput("--ba: no observations to adjust (no tracks)")
            options = pycolmap.BundleAdjustmentOptions()
            options.refine_focal_length = refine_focal_length
            options.refine_principal_point = False
            options.refine_extra_params = False
            options.print_summary = False
            for pid in [pid for pid, p in rec.points3D.items() if p.track.length() < 2]:
                rec.delete_point3D(pid)  # unconstrained along its ray: bundle adjustment refuses it
            if rec.num_points3D() == 0:
                raise InvalidInput("--ba: no point is observed in two views (no tracks to adjust)")
            pycolmap.bundle_adjustment(rec, options)
            rec.update_point_3d_errors()
            summary["reprojection_error_px_after_ba"] = rec.compute_mean_reprojection_error()
            summary["points3D"] = rec.num_points3D()
        with writing(out):
            for f in tmp.iterdir():
                f.unlink()
            rec.write_binary(str(tmp)) if binary else rec.write_text(str(tmp))
            out.mkdir(exist_ok=True)
            check_destination(out, overwrite)  # again: another writer may have filled it meanwhile
            for f in sorted(tmp.iterdir()):
                os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary["path"] = str(out)
    summary["format"] = "binary" if binary else "text"
    return summary


def read_colmap(path: str | os.PathLike) -> dict[str, Any]:
    """A COLMAP model folder -> lite3r conventions: {names, sizes, extrinsics [S,3,4] w2c, intrinsics [S,3,3]
    (integer pixel centres), camera_models}, images sorted by name. One-line errors for what pycolmap cannot read
    or lite3r cannot use (cameras other than pinhole / simple pinhole / radial with zero distortion)."""
    import pycolmap

    path = Path(path)
    if not path.is_dir():
        raise MissingInput(f"{path}: no such COLMAP model folder")
    if not any((path / f"cameras{s}").is_file() for s in (".bin", ".txt")):
        raise InvalidInput(f"{path}: not a COLMAP model (no cameras.bin / cameras.txt)")
    try:
        rec = pycolmap.Reconstruction(str(path))
    except Exception as e:  # pycolmap raises its own types for corrupt files
        first = str(e).splitlines()[0] if str(e) else ""
        raise InvalidInput(f"{path}: cannot read the COLMAP model ({type(e).__name__}: {first})") from None
    names, sizes, ext, K = [], [], [], []
    for image in sorted(rec.images.values(), key=lambda im: im.name):
        cam = rec.cameras[image.camera_id]
        K.append(_pinhole(cam, path))
        names.append(image.name)
        sizes.append((int(cam.width), int(cam.height)))
        ext.append(np.asarray(image.cam_from_world().matrix()))
    if not names:
        raise InvalidInput(f"{path}: the COLMAP model has no images")
    return {"names": names, "sizes": sizes, "extrinsics": torch.from_numpy(np.stack(ext)).float(),
            "intrinsics": torch.from_numpy(np.stack(K)).float()}


def _pinhole(cam, path: Path) -> np.ndarray:
    model = str(cam.model_name) if hasattr(cam, "model_name") else str(cam.model).split(".")[-1]
    p = np.asarray(cam.params, dtype=np.float64)
    if model == "PINHOLE":
        fx, fy, cx, cy = p
    elif model == "SIMPLE_PINHOLE":
        fx, cx, cy = p
        fy = fx
    elif model in ("SIMPLE_RADIAL", "RADIAL") and np.all(p[3:] == 0):
        fx, cx, cy = p[:3]
        fy = fx
    else:
        raise InvalidInput(f"{path}: camera {cam.camera_id} is {model} (with distortion); lite3r needs pinhole "
                         f"cameras (undistort the images first, e.g. colmap image_undistorter)")
    return np.array([[fx, 0, cx - 0.5], [0, fy, cy - 0.5], [0, 0, 1]])


__all__ = ["ColmapScene", "check_destination", "colmap_text", "grid_queries", "model_to_original",
           "points_to_original", "read_colmap", "scene_from_prediction", "write_colmap"]
