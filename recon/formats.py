"""Readers and writers of the multi-view stereo file formats (MVSNet / BlendedMVS / DTU).

- cam.txt: `extrinsic` + 4x4 world-to-camera, `intrinsic` + 3x3, then `DEPTH_MIN DEPTH_INTERVAL [DEPTH_NUM
  [DEPTH_MAX]]`. Parsed by whitespace tokens: extrinsic = tokens 1-16, intrinsic = 18-26, depth values from 27.
- PFM: `Pf` (1 channel) / `PF` (3 channels), `W H`, scale (negative: little endian), float32 rows bottom-up.
- pair.txt: N, then per view a line with its id and a line `K id score id score ...`.

Every reader raises ValueError / FileNotFoundError with one line naming the file and what was expected.
Writers go through recon.io (atomic, no overwrite unless asked).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from lite3r_recon.io import atomic_write_bytes, atomic_write_text
from lite3r_recon.errors import InvalidInput, MissingInput


# ------------------------------------------------------------------------------------------------------ cam.txt
@dataclasses.dataclass(frozen=True)
class Camera:
    """One MVSNet camera: extrinsic [4,4] world-to-camera, intrinsic [3,3] in pixels, depth values (2 to 4:
    depth_min, depth_interval, [depth_num, [depth_max]])."""

    extrinsic: np.ndarray
    intrinsic: np.ndarray
    depth: tuple[float, ...]

    @property
    def depth_min(self) -> float:
        return self.depth[0]

    @property
    def depth_max(self) -> float | None:
        if len(self.depth) >= 4:
            return self.depth[3]
        if len(self.depth) >= 3:
            return self.depth[0] + self.depth[1] * (self.depth[2] - 1)
        return None


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise MissingInput(f"{path}: no such {what} file")
    try:
        return path.read_text(encoding="utf-8", errors="strict")
    except (UnicodeDecodeError, OSError) as e:
        raise InvalidInput(f"{path}: cannot read {what} file ({e})") from None


def parse_cam(text: str, name: str = "<cam>") -> Camera:
    tok = text.split()
    if len(tok) < 29 or tok[0].lower() != "extrinsic" or tok[17].lower() != "intrinsic":
        raise InvalidInput(f"{name}: not an MVSNet cam.txt (expected 'extrinsic' + 16 numbers, 'intrinsic' + 9 "
                         f"numbers, then 2-4 depth values; got {len(tok)} tokens)")
    try:
        E = np.array([float(t) for t in tok[1:17]], dtype=np.float64).reshape(4, 4)
        K = np.array([float(t) for t in tok[18:27]], dtype=np.float64).reshape(3, 3)
        depth = tuple(float(t) for t in tok[27:31])
    except ValueError as e:
        raise InvalidInput(f"{name}: non-numeric value in cam.txt ({e})") from None
    if len(tok) > 31:
        raise InvalidInput(f"{name}: cam.txt has {len(tok) - 27} depth values, expected 2 to 4")
    if not (np.isfinite(E).all() and np.isfinite(K).all() and np.isfinite(depth).all()):
        raise InvalidInput(f"{name}: cam.txt holds NaN or inf")
    return Camera(E, K, depth)


def read_cam(path: str | os.PathLike) -> Camera:
    """An MVSNet cam.txt -> Camera (float64)."""
    path = Path(path)
    return parse_cam(_read_text(path, "camera"), str(path))


def format_cam(extrinsic, intrinsic, depth=(0.0, 1.0)) -> str:
    E = np.asarray(extrinsic, dtype=np.float64)
    if E.shape == (3, 4):
        E = np.vstack([E, [0.0, 0.0, 0.0, 1.0]])
    K = np.asarray(intrinsic, dtype=np.float64)
    depth = tuple(float(d) for d in depth)
    if E.shape != (4, 4) or K.shape != (3, 3) or not 2 <= len(depth) <= 4:
        raise InvalidInput(f"cam.txt needs extrinsic [4,4] or [3,4], intrinsic [3,3] and 2-4 depth values; got "
                         f"{E.shape}, {K.shape}, {len(depth)}")
    rows = lambda M: "\n".join(" ".join(repr(float(v)) for v in r) for r in M)  # noqa: E731 (repr: exact float)
    depth_s = " ".join(str(int(d)) if i == 2 else repr(d) for i, d in enumerate(depth))
    return f"extrinsic\n{rows(E)}\n\nintrinsic\n{rows(K)}\n\n{depth_s}\n"


def write_cam(path: str | os.PathLike, extrinsic, intrinsic, depth=(0.0, 1.0), *, overwrite: bool = False) -> Path:
    """Write an MVSNet cam.txt: extrinsic [4,4] or [3,4] world-to-camera, intrinsic [3,3], depth 2-4 values."""
    return atomic_write_text(path, format_cam(extrinsic, intrinsic, depth), overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------------- PFM
def read_pfm(path: str | os.PathLike) -> np.ndarray:
    """PFM -> float32 [H,W] (Pf) or [H,W,3] (PF), top row first."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: no such PFM file")
    data = path.read_bytes()
    # header: three whitespace-separated fields, each ended by one whitespace char (lines in practice)
    m = re.match(rb"(P[Ff])\s+(\d+)\s+(\d+)\s+([-+0-9.eE]+)\s", data)
    if m is None:
        raise InvalidInput(f"{path}: not a PFM file (expected 'Pf'/'PF', 'W H', scale)")
    channels = 3 if m.group(1) == b"PF" else 1
    w, h = int(m.group(2)), int(m.group(3))
    try:
        scale = float(m.group(4))
    except ValueError:
        raise InvalidInput(f"{path}: bad PFM scale {m.group(4)!r}") from None
    if scale == 0:
        raise InvalidInput(f"{path}: PFM scale is 0 (its sign gives the byte order)")
    n = w * h * channels
    body = data[m.end():]
    if len(body) < 4 * n:
        raise InvalidInput(f"{path}: truncated PFM ({len(body)} bytes of data, expected {4 * n} for {w}x{h}x{channels})")
    arr = np.frombuffer(body, dtype="<f4" if scale < 0 else ">f4", count=n).astype(np.float32)
    arr = arr.reshape(h, w, channels) if channels == 3 else arr.reshape(h, w)
    return np.ascontiguousarray(arr[::-1])


def pfm_bytes(array, *, little_endian: bool = True) -> bytes:
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise InvalidInput(f"PFM needs [H,W] or [H,W,3], got {a.shape}")
    kind = b"PF" if a.ndim == 3 else b"Pf"
    header = kind + b"\n" + f"{a.shape[1]} {a.shape[0]}\n".encode() + (b"-1.0\n" if little_endian else b"1.0\n")
    return header + np.ascontiguousarray(a[::-1]).astype("<f4" if little_endian else ">f4").tobytes()


def write_pfm(path: str | os.PathLike, array, *, little_endian: bool = True, overwrite: bool = False) -> Path:
    """float32 [H,W] or [H,W,3] (top row first) -> PFM."""
    return atomic_write_bytes(path, pfm_bytes(array, little_endian=little_endian), overwrite=overwrite)


# ----------------------------------------------------------------------------------------------------- pair.txt
def read_pair(path: str | os.PathLike) -> dict[int, list[tuple[int, float]]]:
    """pair.txt -> {view id: [(source id, score), ...]} in file order."""
    path = Path(path)
    tok = _read_text(path, "pair").split()
    try:
        n, i, out = int(tok[0]), 1, {}
        for _ in range(n):
            ref, k = int(tok[i]), int(tok[i + 1])
            src = tok[i + 2: i + 2 + 2 * k]
            if len(src) != 2 * k:
                raise IndexError
            out[ref] = [(int(src[2 * j]), float(src[2 * j + 1])) for j in range(k)]
            i += 2 + 2 * k
    except (IndexError, ValueError):
        raise InvalidInput(f"{path}: malformed pair.txt (expected N, then per view 'id' and 'K id score ...')") from None
    return out


def write_pair(path: str | os.PathLike, pairs: dict[int, list[tuple[int, float]]], *, overwrite: bool = False) -> Path:
    lines = [str(len(pairs))]
    for ref, src in pairs.items():
        lines.append(str(int(ref)))
        lines.append(" ".join([str(len(src))] + [f"{int(j)} {float(s):.6g}" for j, s in src]))
    return atomic_write_text(path, "\n".join(lines) + "\n", overwrite=overwrite)


__all__ = ["Camera", "format_cam", "parse_cam", "pfm_bytes", "read_cam", "read_pair", "read_pfm", "write_cam",
           "write_pair", "write_pfm"]
