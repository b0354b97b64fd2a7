"""Video input: frames sampled at a rate (PyAV, whose wheel ships FFmpeg), written as images for the image pipeline.

    files = extract_frames("clip.mp4", "frames/", fps=2, max_views=32)   # frames/clip_000000.png, ...
    write_video("clip.mp4", frames_uint8, fps=10)                        # [T, H, W, 3]: tests and demos

A frame is taken at each multiple of 1/fps seconds (the first decoded frame at or after it); with more samples than
`max_views`, `max_views` of them evenly spread over the clip are kept.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from lite3r_recon.errors import InvalidInput, MissingInput

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def keep_evenly(n: int, max_views: int | None) -> list[int]:
    """Indices of at most `max_views` of n items, evenly spread, first and last included."""
    if max_views is None or n <= max_views:
        return list(range(n))
    if max_views == 1:
        return [0]
    return sorted({round(i * (n - 1) / (max_views - 1)) for i in range(max_views)})


def upright(frame: np.ndarray, rotation: float) -> np.ndarray:
    """A decoded frame [H, W, 3] turned as its display matrix says (`rotation`: degrees counterclockwise, as PyAV
    reports it; phones store portrait video as landscape frames with +-90)."""
    k = round(rotation / 90.0) % 4
    return np.ascontiguousarray(np.rot90(frame, k)) if k else frame


def sample_frames(path: str | os.PathLike, fps: float, max_views: int | None = None) -> list[np.ndarray]:
    """RGB frames [H, W, 3] uint8 of the video at `path`, one per 1/fps seconds, at most `max_views`."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: no such video file")
    if not fps > 0 or not math.isfinite(fps):
        raise InvalidInput(f"--fps {fps}: expected a positive number of frames per second")
    if max_views is not None and max_views < 1:
        raise InvalidInput(f"--max-views {max_views}: expected at least 1")
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidInput(f"{path}: no video stream in this file")
            stream = container.streams.video[0]
            next_t = 0.0
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else len(frames) / fps
                if t + 1e-6 >= next_t:
                    frames.append(upright(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0) or 0))
                    next_t = (math.floor(t * fps + 1e-6) + 1) / fps
    except av.error.FFmpegError as e:
        raise InvalidInput(f"{path}: cannot read video ({type(e).__name__}: {e}); the file may be truncated or "
                           f"not a video") from None
    if not frames:
        raise InvalidInput(f"{path}: the video has no decodable frames")
    return [frames[i] for i in keep_evenly(len(frames), max_views)]


def extract_frames(path: str | os.PathLike, out_dir: str | os.PathLike, fps: float,
                   max_views: int | None = None, *, overwrite: bool = False) -> list[Path]:
    """Sample the video (see `sample_frames`) into `out_dir` as PNG files named <video stem>_<index:06d>.png, in
    time order; returns their paths."""
    from PIL import Image

    from lite3r_recon.io import atomic_path

    out_dir = Path(out_dir)  # made by the first atomic write (ensure_writable), its failure one line
    files = []
    for i, frame in enumerate(sample_frames(path, fps, max_views)):
        f = out_dir / f"{Path(path).stem}_{i:06d}.png"
        with atomic_path(f, overwrite=overwrite) as tmp:
            Image.fromarray(frame).save(tmp, format="PNG")
        files.append(f)
    return files


def expand_videos(files: list[Path], frames_dir: str | os.PathLike, fps: float, max_views: int | None = None, *,
                  overwrite: bool = False) -> tuple[list[Path], dict[str, int]]:
    """`files` with every video replaced by its frames (sampled into `frames_dir`), then at most `max_views` files
    evenly kept. Returns (files, {video: frames taken})."""
    out: list[Path] = []
    taken: dict[str, int] = {}
    for f in files:
        if is_video(f):
            frames = extract_frames(f, frames_dir, fps, max_views, overwrite=overwrite)
            taken[str(f)] = len(frames)
            out += frames
        else:
            out.append(Path(f))
    if max_views is not None and max_views < 1:
        raise InvalidInput(f"--max-views {max_views}: expected at least 1")
    return [out[i] for i in keep_evenly(len(out), max_views)], taken


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 10.0, *, overwrite: bool = False) -> Path:
    """Frames [T, H, W, 3] uint8 (H, W even) -> an MPEG-4 video (FFmpeg's own mpeg4 encoder), written atomically."""
    import av

    from lite3r_recon.io import atomic_path

    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InvalidInput(f"frames: expected [T, H, W, 3] uint8, got {frames.shape} {frames.dtype}")
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("mpeg4", rate=round(fps))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.bit_rate = 4_000_000
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path


__all__ = ["VIDEO_SUFFIXES", "expand_videos", "extract_frames", "is_video", "keep_evenly", "sample_frames", "upright",
           "write_video"]
