"""Known cameras for `reconstruct --intrinsics / --cameras`: from a JSON file or a COLMAP model folder.

Conventions: pixel intrinsics of the ORIGINAL images, pixel centres at integer coordinates (OpenCV; a COLMAP
model's +0.5 centres are converted on reading), world-to-camera [R|t] extrinsics with OpenCV axes.

JSON forms (a camera is {"intrinsics": [[fx,0,cx],[0,fy,cy],[0,0,1]]} or {"fx", "fy", "cx", "cy"}, optionally with
"extrinsics_w2c" (3x4 or 4x4), "image" (file name, matched to the inputs by name) and "width" / "height" (checked
against the image)):

    {"fx": 500, "fy": 500, "cx": 319.5, "cy": 239.5}          # one camera shared by every view
    {"cameras": [{"image": "a.jpg", "intrinsics": ..., "extrinsics_w2c": ...}, ...]}   # or a bare list
Without "image" names, cameras are taken in input order and their number must match the views. A
`lite3r reconstruct --json` file works too (its intrinsics_original, extrinsics_w2c and image names).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lite3r_recon.errors import InvalidInput, MissingInput


def _matrix(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInput(f"{what}: expected numbers in a {shape[0]}x{shape[1]} matrix") from None
    if m.shape != shape or not np.isfinite(m).all():
        raise InvalidInput(f"{what}: expected a finite {shape[0]}x{shape[1]} matrix, got shape {list(m.shape)}")
    return m


def _intrinsics(cam: dict, what: str) -> np.ndarray:
    if "intrinsics" in cam:
        K = _matrix(cam["intrinsics"], (3, 3), f"{what} intrinsics")
    elif all(k in cam for k in ("fx", "fy", "cx", "cy")):
        try:
            fx, fy, cx, cy = (float(cam[k]) for k in ("fx", "fy", "cx", "cy"))
        except (TypeError, ValueError):
            raise InvalidInput(f"{what}: fx, fy, cx, cy must be numbers") from None
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    else:
        raise InvalidInput(f"{what}: expected \"intrinsics\" (3x3) or \"fx\", \"fy\", \"cx\", \"cy\"")
    if not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0 or np.any(K[2] != (0, 0, 1)) or K[1, 0] != 0:
        raise InvalidInput(f"{what}: intrinsics need fx, fy > 0 and the rows [fx s cx] [0 fy cy] [0 0 1]")
    return K


def _extrinsics(cam: dict, what: str) -> np.ndarray | None:
    if "extrinsics_w2c" not in cam:
        return None
    raw = np.asarray(cam["extrinsics_w2c"], dtype=object)
    E = _matrix(cam["extrinsics_w2c"], (4, 4) if raw.shape[:1] == (4,) else (3, 4), f"{what} extrinsics_w2c")[:3]
    R = E[:, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise InvalidInput(f"{what} extrinsics_w2c: the 3x3 part is not a rotation (orthonormal, det +1)")
    return E


def _from_json(path: Path, flag: str) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise InvalidInput(f"{flag} {path}: not a text (JSON) file") from None
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{flag} {path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if isinstance(data, dict) and "image_hw" in data and "convention" in data:  # a `reconstruct --json` file
        try:
            data = {"cameras": [{"image": c["image"], "intrinsics": c["intrinsics_original"],
                                 "extrinsics_w2c": c["extrinsics_w2c"], "width": c["image_size"][0],
                                 "height": c["image_size"][1]} for c in data["cameras"]]}
        except (KeyError, TypeError, IndexError):
            raise InvalidInput(f"{flag} {path}: a reconstruct --json file without intrinsics_original (written by "
                               f"an older lite3r); use its --colmap model instead") from None
    cams = data.get("cameras", data) if isinstance(data, dict) else data
    if isinstance(cams, dict):
        cams = [cams]
    if not isinstance(cams, list) or not cams or not all(isinstance(c, dict) for c in cams):
        raise InvalidInput(f"{flag} {path}: expected a camera object, a list of them, or {{\"cameras\": [...]}}")
    out = []
    for i, cam in enumerate(cams):
        what = f"{flag} {path} camera {i}"
        size = (cam.get("width"), cam.get("height"))
        out.append({"name": cam.get("image"), "K": _intrinsics(cam, what), "E": _extrinsics(cam, what),
                    "size": tuple(int(v) for v in size) if None not in size else None, "what": what})
    return out


def _from_colmap(path: Path, flag: str) -> list[dict]:
    from lite3r_recon.colmap import read_colmap
    from lite3r_recon.errors import Lite3rError

    try:
        model = read_colmap(path)
    except Lite3rError as e:
        raise type(e)(f"{flag} {e}") from None
    return [{"name": n, "K": K.double().numpy(), "E": E.double().numpy(), "size": s,
             "what": f"{flag} {path} image {n}"}
            for n, s, K, E in zip(model["names"], model["sizes"], model["intrinsics"], model["extrinsics"])]


def load_known_cameras(path: str | os.PathLike, names: list[str], sizes: list[tuple[int, int]], *,
                       poses: bool = False, flag: str = "--intrinsics") -> dict[str, Tensor | None]:
    """Cameras for the views `names` (file names) of sizes (width, height): {"intrinsics": [S,3,3], "extrinsics":
    [S,3,4] or None} (float64, original pixels). `poses`: every view needs extrinsics too. One-line errors name
    `flag`, the file, and the camera."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{flag} {path}: no such JSON file or COLMAP model folder")
    cams = _from_colmap(path, flag) if path.is_dir() else _from_json(path, flag)
    named = [c for c in cams if c["name"] is not None]
    if named and len(named) != len(cams):
        raise InvalidInput(f"{flag} {path}: give every camera an \"image\" name, or none")
    if named:
        by_name = {Path(c["name"]).name: c for c in cams}
        missing = [n for n in names if Path(n).name not in by_name]
        if missing:
            raise InvalidInput(f"{flag} {path}: no camera for image {Path(missing[0]).name}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        chosen = [by_name[Path(n).name] for n in names]
    elif len(cams) == 1 and not poses:
        chosen = cams * len(names)
    elif len(cams) == len(names):
        chosen = cams
    else:
        raise InvalidInput(f"{flag} {path}: {len(cams)} cameras for {len(names)} views (name them with \"image\", or "
                           f"give one shared camera)")
    for c, (w, h), n in zip(chosen, sizes, names):
        if c["size"] is not None and tuple(c["size"]) != (int(w), int(h)):
            raise InvalidInput(f"{c['what']}: camera is {c['size'][0]}x{c['size'][1]} px, image {Path(n).name} is "
                               f"{w}x{h}")
    if poses and any(c["E"] is None for c in chosen):
        raise InvalidInput(f"{flag} {path}: every view needs \"extrinsics_w2c\" (world-to-camera) for --cameras")
    K = torch.from_numpy(np.stack([c["K"] for c in chosen]))
    E = torch.from_numpy(np.stack([c["E"] for c in chosen])) if all(c["E"] is not None for c in chosen) else None
    return {"intrinsics": K, "extrinsics": E if poses else None}


def apply_known_cameras(cams: dict[str, Tensor], known: dict[str, Tensor | None], pixel_map: Tensor) -> float:
    """In place: a prediction's `cams` (extrinsics [S,3,4], intrinsics [S,3,3] in network pixels, depth [S,H,W])
    take the known intrinsics (original pixels, through `pixel_map` [S,3,3]: original -> network pixels) and, when
    given, the known extrinsics, the depth scaled into their units (`similarity_scale` of the camera centres).
    Returns that scale (1.0 without known poses)."""
    cams["intrinsics"] = (pixel_map.double() @ known["intrinsics"].double()).to(cams["intrinsics"].dtype)
    if known.get("extrinsics") is None:
        return 1.0
    from lite3r_recon.pointcloud import camera_centers

    E = known["extrinsics"].double()
    scale = similarity_scale(camera_centers(cams["extrinsics"]), camera_centers(E))
    cams["depth"] = cams["depth"] * scale
    cams["extrinsics"] = E.to(cams["extrinsics"].dtype)
    return scale


def similarity_scale(pred_centres: Tensor, known_centres: Tensor) -> float:
    """Scale of the least-squares similarity taking predicted camera centres [S, 3] onto known ones (1.0 when
    either set has no spread): multiplies predicted depth into the known cameras' units."""
    p = pred_centres.double() - pred_centres.double().mean(0)
    k = known_centres.double() - known_centres.double().mean(0)
    sp, sk = float(p.square().sum()), float(k.square().sum())
    if sp < 1e-12 or sk < 1e-12:
        return 1.0
    # Umeyama: s = trace(D S) / var(p), with the SVD of the cross-covariance (reflections excluded)
    U, D, Vt = torch.linalg.svd(k.T @ p)
    sign = torch.ones(3, dtype=D.dtype)
    sign[-1] = float(torch.sign(torch.det(U @ Vt))) or 1.0
    scale = float((D * sign).sum()) / sp
    return scale if math.isfinite(scale) and scale > 0 else 1.0


__all__ = ["apply_known_cameras", "load_known_cameras", "similarity_scale"]
