"""Image loading like the official VGGT demo (``load_and_preprocess_images``), with intrinsics kept consistent.

- ``mode="crop"``: width -> ``size``, height -> the aspect-preserving height rounded to a multiple of 14, then a
  centre crop of the height to ``size`` when it is taller.
- ``mode="pad"``: the longer side -> ``size``, the other -> aspect-preserving, rounded to a multiple of 14, then
  white (1.0) padding to ``size`` x ``size``.
- Resampling is PIL bicubic; RGBA is composited on white; images of different shapes (crop mode) are padded with
  white to the largest, as the official loader does.

Intrinsics [S,3,3] (pixels, of the original images) are adjusted for the resize (per-axis scale), the crop and the
padding, so projections stay consistent with the returned pixels.
"""
from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from lite3r_recon.errors import InvalidInput, MissingInput


def resize_intrinsics(K, sx: float, sy: float):
    """Pixel intrinsics [..., 3, 3] (numpy or torch, changed in place and returned) of an image resized by (sx, sy).
    Pixel centres sit at integer coordinates (OpenCV) and a resize maps image edges to edges (PIL,
    F.interpolate(align_corners=False)), so x' + 0.5 = (x + 0.5) s: fx and skew scale, cx' = (cx + 0.5) sx - 0.5."""
    K[..., 0, :] *= sx
    K[..., 1, :] *= sy
    K[..., 0, 2] += 0.5 * (sx - 1.0)
    K[..., 1, 2] += 0.5 * (sy - 1.0)
    return K

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_images(folder: str | os.PathLike) -> list[pathlib.Path]:
    """Sorted image files in a folder; a clear error when the folder is missing or holds none."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise MissingInput(f"{folder}: no such image folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidInput(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def _open_rgb(path: pathlib.Path):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise MissingInput(f"{path}: no such image file")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidInput(f"{path}: cannot read image ({e}); the file may be truncated or not an image") from None
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def target_hw(height: int, width: int, mode: str, size: int = 518, patch: int = 14) -> tuple[int, int]:
    """Resized (height, width) before crop/pad: multiples of ``patch``, aspect ratio kept."""
    if mode == "pad" and height > width:
        return size, round(width * (size / height) / patch) * patch
    return round(height * (size / width) / patch) * patch, size


def load_images(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    mode: str = "crop",
    size: int = 518,
    intrinsics: Tensor | np.ndarray | None = None,
    with_mask: bool = False,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
    """Load images -> (images [S,3,H,W] float32 in [0,1], adjusted intrinsics [S,3,3] or None), and with
    ``with_mask`` also the real pixels, bool [S,H,W] (False on the white padding of pad mode and of mixed aspect
    ratios, which the network still sees and predicts depth for).

    ``paths`` may be a list of files or one folder (its images, sorted by name). ``size`` must be a multiple of
    14. ``intrinsics``: pixel intrinsics of the original images, one per path.
    """
    if mode not in ("crop", "pad"):
        raise InvalidInput(f"mode must be 'crop' or 'pad', got {mode!r}")
    if size % 14:
        raise InvalidInput(f"size must be a multiple of 14 (the patch size), got {size}")
    if isinstance(paths, (str, os.PathLike)):
        paths = list_images(paths)
    paths = [pathlib.Path(p) for p in paths]
    if not paths:
        raise InvalidInput("no image paths given")
    K = None
    if intrinsics is not None:
        K = torch.as_tensor(np.asarray(intrinsics), dtype=torch.float64).clone()
        if K.shape != (len(paths), 3, 3):
            raise InvalidInput(f"intrinsics must be [{len(paths)}, 3, 3] (one per image), got {tuple(K.shape)}")

    images, masks = [], []
    for i, path in enumerate(paths):
        img = _open_rgb(path)
        w0, h0 = img.size
        h, w = target_hw(h0, w0, mode, size)
        if min(h, w) < 14:  # a sliver (2000x1): nothing of it would be left for one patch
            raise InvalidInput(f"{path}: a {w0}x{h0} image becomes {w}x{h} pixels at size {size} in {mode} mode, "
                               f"less than one 14-pixel patch; expected an aspect ratio nearer 1")
        from PIL import Image

        img = img.resize((w, h), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        m = torch.ones(1, h, w, dtype=torch.bool)
        top = left = 0
        if mode == "crop" and h > size:
            top = -((h - size) // 2)
            x, m = x[:, -top : -top + size], m[:, -top : -top + size]
        elif mode == "pad":
            ph, pw = size - h, size - w
            top, left = ph // 2, pw // 2
            x = F.pad(x, (left, pw - left, top, ph - top), value=1.0)
            m = F.pad(m, (left, pw - left, top, ph - top), value=False)
        if K is not None:
            resize_intrinsics(K[i], w / w0, h / h0)
            K[i, 0, 2] += left
            K[i, 1, 2] += top
        images.append(x)
        masks.append(m)

    H = max(x.shape[1] for x in images)
    W = max(x.shape[2] for x in images)
    for i, x in enumerate(images):  # crop mode with mixed aspect ratios: pad to the largest, centred, white
        ph, pw = H - x.shape[1], W - x.shape[2]
        if ph or pw:
            border = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
            images[i] = F.pad(x, border, value=1.0)
            masks[i] = F.pad(masks[i], border, value=False)
            if K is not None:
                K[i, 0, 2] += pw // 2
                K[i, 1, 2] += ph // 2
    out = torch.stack(images), (K.float() if K is not None else None)
    return (*out, torch.cat(masks)) if with_mask else out
