"""Scene loaders: BlendedMVS (low-res), DTU64 (pose only) and synthetic scenes, all yielding the same samples.

    ds = open_dataset("blendedmvs", "data/BlendedMVS", size=518)     # or (H, W); "synthetic" reads make-scenes
    s = ds.sample(0, views=8, rng=np.random.default_rng(0))            # dict of tensors, see `sample`

A sample: images [S,3,H,W] float32 in [0,1], extrinsics [S,3,4] world-to-camera (OpenCV), intrinsics [S,3,3]
(pixels of the returned images), depth [S,H,W] (0 where unknown; all 0 for DTU64), mask [S,H,W] bool (valid depth),
plus `names` (the image files) and `scene`. `size` int: the backbone's crop mode (width -> size, height
aspect-preserving to a multiple of 14, centre-cropped to at most size; backbones.preprocess.target_hw); (H, W):
scaled to cover H x W, then centre-cropped. Depth is resampled nearest-neighbour on the same grid. With
`normalize=True` frame 0 becomes the world and translations (and depth) are divided by the mean distance of valid
points (DTU64: of the camera centres) to the first camera.

Views that cannot be used (missing / corrupt image, cam or depth file, empty depth map, depth_min <= 0 in the cam
file) are skipped with a warning naming the file; a scene with too few usable views raises one ValueError naming it.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lite3r_backbones.preprocess import resize_intrinsics
from lite3r_recon import formats
from lite3r_recon.errors import InvalidInput, MissingInput

DTU64_SCANS = (24, 37, 40, 55, 63, 65, 69, 83, 97, 105, 114, 118, 122)
DATASETS = ("blendedmvs", "dtu64", "synthetic")


@dataclasses.dataclass(frozen=True)
class View:
    image: Path
    cam: Path
    depth: Path | None  # None: no depth (DTU64)


@dataclasses.dataclass(frozen=True)
class SceneFiles:
    name: str
    views: tuple[View, ...]
    pairs: dict | None = None  # pair.txt: {view index: [(view index, score), ...]}
    needs_depth: bool = True  # depth_min <= 0 / empty depth map make the view unusable


class ViewError(InvalidInput):
    """A view that cannot be used (the message names the file)."""


class SceneError(InvalidInput):
    """A scene that cannot give the views asked for (too few usable views, views of different sizes)."""


def sample_or_skip(ds, index: int, views: int, rng: np.random.Generator | None = None, *, normalize: bool = False,
                   bad: set[int], total: int | None = None) -> dict | None:
    """`ds.sample(index, ...)`, or None with a warning (once per scene) when that scene cannot give `views` usable
    views: one unreadable file skips its scene, not the run. `bad` collects the skipped scenes; once more than half
    of `total` (default: all of ds) are bad, too few remain and it is a one-line error. Always tries the scene, so
    the rng is drawn from the same way whatever was skipped before (a resumed run draws what the first one did)."""
    try:
        return ds.sample(index, views=views, rng=rng, normalize=normalize)
    except SceneError as err:
        if index not in bad:
            bad.add(index)
            warnings.warn(f"skipping {err}", stacklevel=2)
        total = len(ds) if total is None else total
        if 2 * len(bad) > total:
            raise InvalidInput(f"{len(bad)} of {total} scenes cannot give {views} usable views (the last: {err}); too "
                               f"few remain: fix the files or ask for fewer --views") from None
        return None


# -------------------------------------------------------------------------------------------- geometry
def fit_view(image, depth: np.ndarray | None, K: np.ndarray, size: int | tuple[int, int]):
    """PIL image (+ depth [h,w] at the image's resolution, + K [3,3]) -> (image [3,H,W] float32 in [0,1],
    depth [H,W] float32 or None, adjusted K float64). Pixel centres at integer coordinates, as load_images."""
    from PIL import Image

    from lite3r_backbones.preprocess import target_hw

    w0, h0 = image.size
    if isinstance(size, int):
        if size % 14:
            raise InvalidInput(f"size must be a multiple of 14 (the patch size), got {size}")
        h, w = target_hw(h0, w0, "crop", size)
        H, W = min(h, size), w
    else:
        H, W = int(size[0]), int(size[1])
        s = max(H / h0, W / w0)
        h, w = max(H, round(h0 * s)), max(W, round(w0 * s))
    img = image.resize((w, h), Image.Resampling.BICUBIC)
    top, left = (h - H) // 2, (w - W) // 2
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    x = x[:, top:top + H, left:left + W].contiguous()
    K = np.array(K, dtype=np.float64)
    resize_intrinsics(K, w / w0, h / h0)
    K[0, 2] -= left
    K[1, 2] -= top
    d = None
    if depth is not None:
        if depth.shape != (h0, w0):  # depth at another resolution than the image: sample it in its own pixels
            dh, dw = depth.shape
        else:
            dh, dw = h0, w0
        # nearest source pixel of each output pixel centre, same pixel-centre convention as resize_intrinsics
        rows = np.clip(np.round((np.arange(H) + top + 0.5) * dh / h - 0.5), 0, dh - 1).astype(np.int64)
        cols = np.clip(np.round((np.arange(W) + left + 0.5) * dw / w - 0.5), 0, dw - 1).astype(np.int64)
        d = torch.from_numpy(np.ascontiguousarray(depth[rows][:, cols], dtype=np.float32))
    return x, d, K


def normalize_sample(sample: dict[str, Tensor]) -> dict[str, Tensor]:
    """Frame 0 as the world; translations and depth divided by the mean distance of valid points (no valid depth:
    of the camera centres) to the first camera. Adds `scale` (the divisor)."""
    from lite3r_backbones.cameras import compose, se3_inverse, unproject_depth

    E = compose(sample["extrinsics"].double(), se3_inverse(sample["extrinsics"][:1].double()))
    mask = sample["mask"]
    if mask.any():
        pts = unproject_depth(sample["depth"].double()[None], E[None], sample["intrinsics"].double()[None])[0]
        scale = pts.norm(dim=-1)[mask].mean()
    else:
        centres = se3_inverse(E)[:, :, 3]
        scale = centres.norm(dim=-1)[1:].mean() if len(centres) > 1 else torch.ones((), dtype=torch.float64)
    scale = scale.clamp(1e-9, 1e12)
    E = torch.cat([E[..., :3], E[..., 3:] / scale], -1)
    return {**sample, "extrinsics": E.float(), "depth": (sample["depth"].double() / scale).float(),
            "scale": scale.float()}


# ---------------------------------------------------------------------------------------------- datasets
class SceneDataset:
    """Scenes on disk (BlendedMVS layout, DTU64) -> samples of `views` views each."""

    def __init__(self, scenes: list[SceneFiles], size: int | tuple[int, int] = 518, kind: str = "blendedmvs"):
        self.scenes, self.size, self.kind = scenes, size, kind

    def __len__(self) -> int:
        return len(self.scenes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.kind}, {len(self)} scenes, size={self.size})"

    def choose(self, index: int, views: int, rng: np.random.Generator | None) -> list[int]:
        """View order to try: with rng, a random reference then its pair.txt neighbours (or random others);
        without, `views` evenly spaced views first, then the rest (replacements for unusable ones)."""
        n = len(self.scenes[index].views)
        if rng is None:
            first = list(dict.fromkeys(np.linspace(0, n - 1, min(views, n)).round().astype(int).tolist()))
            return first + [i for i in range(n) if i not in first]
        ref = int(rng.integers(n))
        pairs = self.scenes[index].pairs or {}
        near = [j for j, _ in pairs.get(ref, []) if 0 <= j < n and j != ref]
        rest = [int(j) for j in rng.permutation(n) if j != ref and j not in near]
        return [ref] + near[: views - 1] + rest + near[views - 1:]

    def load_view(self, scene: SceneFiles, i: int) -> dict:
        from lite3r_backbones.preprocess import _open_rgb

        v = scene.views[i]
        cam = formats.read_cam(v.cam)
        if scene.needs_depth and cam.depth_min <= 0:
            raise ViewError(f"{v.cam}: depth_min {cam.depth_min} <= 0")
        depth = None
        if v.depth is not None:
            depth = formats.read_pfm(v.depth)
            if depth.ndim != 2:
                raise ViewError(f"{v.depth}: expected a 1-channel (Pf) depth map, got {depth.shape[2]} channels")
            if not (np.isfinite(depth) & (depth > 0)).any():
                raise ViewError(f"{v.depth}: empty depth map (no positive finite value)")
        img = _open_rgb(v.image)
        x, d, K = fit_view(img, depth, cam.intrinsic, self.size)
        if d is None:
            d = torch.zeros(x.shape[1:])
        d = torch.where(torch.isfinite(d) & (d > 0), d, torch.zeros_like(d))
        return {"image": x, "depth": d, "K": K, "E": cam.extrinsic[:3]}

    def sample(self, index: int, views: int = 8, rng: np.random.Generator | None = None, *,
               normalize: bool = False) -> dict:
        if not 0 <= index < len(self.scenes):
            raise IndexError(f"scene index {index} out of range ({len(self.scenes)} scenes)")
        scene = self.scenes[index]
        got: list[dict] = []
        names: list[str] = []
        for i in self.choose(index, views, rng):
            if len(got) == views:
                break
            try:
                got.append(self.load_view(scene, i))
                names.append(str(scene.views[i].image))
            except (ValueError, FileNotFoundError, OSError) as e:
                warnings.warn(f"skipping view: {e}", stacklevel=2)
        if len(got) < views:
            raise SceneError(f"scene {scene.name}: only {len(got)} usable views of {len(scene.views)}, "
                             f"{views} asked")
        shapes = {tuple(g["image"].shape) for g in got}
        if len(shapes) > 1:
            raise SceneError(f"scene {scene.name}: views of different sizes after resizing {sorted(shapes)}")
        depth = torch.stack([g["depth"] for g in got])
        out = {"images": torch.stack([g["image"] for g in got]), "depth": depth, "mask": depth > 0,
               "extrinsics": torch.from_numpy(np.stack([g["E"] for g in got])).float(),
               "intrinsics": torch.from_numpy(np.stack([g["K"] for g in got])).float(),
               "names": names, "scene": scene.name}
        return normalize_sample(out) if normalize else out


class SyntheticScenes:
    """Procedural scenes rendered in memory (recon.synthetic): scene k has seed `seed + k`, ray cast on `device`
    (default CPU) and returned on the CPU like every dataset's samples. `keep`: remember each rendered sample (a held-out set scored again and again during training)."""

    kind = "synthetic"

    def __init__(self, num: int = 4, size: int | tuple[int, int] = (126, 168), seed: int = 0, *, device=None,
                 keep: bool = False):
        if num < 1:
            raise InvalidInput(f"need at least 1 synthetic scene, got {num}")
        self.num, self.size, self.seed, self.device = num, size, seed, device
        self._kept: dict | None = {} if keep else None

    def __len__(self) -> int:
        return self.num

    def __repr__(self) -> str:
        return f"SyntheticScenes({self.num} scenes, size={self.size}, seed={self.seed})"

    def sample(self, index: int, views: int = 8, rng: np.random.Generator | None = None, *,
               normalize: bool = False) -> dict:
        from lite3r_recon.synthetic import render_sample

        if not 0 <= index < self.num:
            raise IndexError(f"scene index {index} out of range ({self.num} scenes)")
        if self._kept is not None and (index, views, normalize) in self._kept:
            return self._kept[index, views, normalize]
        size = self.size if not isinstance(self.size, int) else (self.size, self.size)
        cast = render_sample(self.seed + index, views=views, size=size, device=self.device)
        out = {**{k: v.cpu() for k, v in cast.items()}, "names": [], "scene": f"seed{self.seed + index}"}
        out = normalize_sample(out) if normalize else out
        if self._kept is not None:
            self._kept[index, views, normalize] = out
        return out


# ---------------------------------------------------------------------------------------------- scanning
def _blendedmvs_scene(d: Path) -> SceneFiles | None:
    img_dir, cam_dir = d / "blended_images", d / "cams"
    if not img_dir.is_dir() or not cam_dir.is_dir():
        return None
    views = []
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in (".jpg", ".jpeg", ".png") or p.stem.endswith("_masked"):
            continue
        views.append(View(p, cam_dir / f"{p.stem}_cam.txt", d / "rendered_depth_maps" / f"{p.stem}.pfm"))
    pairs = None
    for pf in (cam_dir / "pair.txt", d / "pair.txt"):
        if pf.is_file():
            try:
                ids = {int(v.image.stem): k for k, v in enumerate(views)}
                raw = formats.read_pair(pf)
                pairs = {ids[r]: [(ids[j], s) for j, s in src if j in ids] for r, src in raw.items() if r in ids}
            except ValueError as e:
                warnings.warn(f"ignoring pair file: {e}", stacklevel=3)
            break
    return SceneFiles(d.name, tuple(views), pairs) if views else None


def scan_blendedmvs(root: str | os.PathLike) -> list[SceneFiles]:
    """Scenes under `root`: root itself when it is a scene, else its sub-folders (one or two levels) holding
    blended_images/ and cams/."""
    root = Path(root)
    if not root.is_dir():
        raise MissingInput(f"{root}: no such dataset folder")
    one = _blendedmvs_scene(root)
    if one:
        return [one]
    scenes = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        s = _blendedmvs_scene(d)
        if s is None and not (d / "cams").is_dir():
            scenes += [x for x in (_blendedmvs_scene(e) for e in sorted(d.iterdir()) if e.is_dir()) if x]
        elif s:
            scenes.append(s)
    if not scenes:
        raise InvalidInput(f"{root}: no BlendedMVS scenes (folders with blended_images/ and cams/)")
    return scenes


def scan_dtu64(root: str | os.PathLike, scans=DTU64_SCANS) -> list[SceneFiles]:
    """DTU64 under `root` (root/dtu64 or root itself): shared Cameras/{idx:08d}_cam.txt, scan{N}/image/*.png with
    6- or 8-digit names (the number is the camera index). Missing scans are skipped with a warning."""
    root = Path(root)
    base = root / "dtu64" if (root / "dtu64").is_dir() else root
    cams = base / "Cameras"
    if not cams.is_dir():
        raise MissingInput(f"{base}: no Cameras/ folder (expected DTU64 layout dtu64/Cameras, dtu64/scanN/image)")
    scenes, missing = [], []
    for n in scans:
        img_dir = base / f"scan{n}" / "image"
        if not img_dir.is_dir():
            missing.append(f"scan{n}")
            continue
        views = []
        for p in sorted(img_dir.iterdir()):
            if p.suffix.lower() != ".png" or not p.stem.isdigit() or len(p.stem) not in (6, 8):
                continue
            views.append(View(p, cams / f"{int(p.stem):08d}_cam.txt", None))
        views.sort(key=lambda v: int(v.image.stem))
        if views:
            scenes.append(SceneFiles(f"scan{n}", tuple(views), None, needs_depth=False))
    if not scenes:
        raise InvalidInput(f"{base}: no DTU64 scans with images (scan{{N}}/image/*.png)")
    if missing:
        warnings.warn(f"{base}: {len(missing)} DTU64 scans missing, skipped: {' '.join(missing)}", stacklevel=2)
    return scenes


def open_dataset(kind: str, path: str | os.PathLike | None = None, *, size: int | tuple[int, int] = 518,
                 num: int = 4, seed: int = 0):
    """'blendedmvs' | 'dtu64' | 'synthetic' -> a dataset with len() and .sample(index, views, rng, normalize).
    'synthetic' without a path: `num` scenes rendered in memory; with a path: scenes written by make-scenes."""
    if kind not in DATASETS:
        raise InvalidInput(f"--dataset must be one of {', '.join(DATASETS)}, got {kind!r}")
    if kind == "synthetic" and path is None:
        return SyntheticScenes(num, size, seed)
    if path is None:
        raise InvalidInput(f"--dataset {kind} needs --data PATH")
    if kind == "dtu64":
        return SceneDataset(scan_dtu64(path), size, "dtu64")
    return SceneDataset(scan_blendedmvs(path), size, kind)


__all__ = ["DATASETS", "DTU64_SCANS", "SceneDataset", "SceneFiles", "SyntheticScenes", "View", "ViewError",
           "fit_view", "normalize_sample", "open_dataset", "scan_blendedmvs", "scan_dtu64"]
