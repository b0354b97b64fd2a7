"""`lite3r reconstruct`: images -> coloured world-space point cloud (PLY / GLB) + cameras (JSON).

    result = reconstruct(["scene/images"], model="vggt-1b", weights="model.safetensors", out="scene.ply",
                         json_path="cameras.json")

Steps: `lite3r_backbones.load_images` (crop / pad to multiples of 14) -> `lite3r_recon.models.load_model` (the dense
backbone, or the lite3r student of `lite3r train`) -> `to_cameras` (w2c OpenCV extrinsics, pixel intrinsics,
depth, confidence) -> `lite3r_recon.pointcloud`: every pixel unprojected into the world frame (the first view's camera for VGGT) -> drop the
points below the `conf_percentile` percentile of the confidence over all views (and any non-finite point) -> write
the cloud with trimesh and the cameras with per-view statistics, both atomically (recon.io), never replacing an
existing file without `overwrite`.

Torch is imported inside the functions, so the CLI reads this module's defaults without loading it.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lite3r_recon.errors import InvalidInput, MissingInput


# ------------------------------------------------------------------------------------------------ model
def resolve_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files from files and folders (a folder: its images sorted by name), in the order given."""
    from lite3r_backbones import list_images

    if not inputs:
        raise InvalidInput("no images given: pass image files or a folder of images")
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += list_images(item)
        elif item.is_file():
            files.append(item)
        else:
            raise MissingInput(f"{item}: no such image file or folder")
    return files


def predict(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """Backbone forward of one scene images [S,3,H,W] (bf16 autocast on CUDA) -> to_cameras output without the
    batch axis, float32 on the CPU."""
    from lite3r_backbones import to_cameras
    from lite3r_recon import models

    out = models.infer(model, images[None])
    cams = to_cameras(model, out, images.shape[-2:])
    return {k: cams[k][0].detach().float().cpu() for k in ("extrinsics", "intrinsics", "depth", "depth_conf")}


# ------------------------------------------------------------------------------------------------ command
def reconstruct(inputs: Sequence[str | os.PathLike], *, model: str = "vggt-1b",
                weights: str | os.PathLike | None = None, student: str | os.PathLike | None = None,
                size: int = 518, mode: str = "crop", conf_percentile: float = 50.0,
                out: str | os.PathLike = "scene.ply", json_path: str | os.PathLike | None = None,
                overwrite: bool = False, device: str | None = None, quiet: bool = False,
                net: nn.Module | None = None) -> dict[str, Any]:
    """Run the whole command; returns the summary written to `json_path` (cameras, per-view stats, timings).
    `net`: an already built backbone / student to use instead of building `model` (its name must be `model`)."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    import torch

    from lite3r_backbones import load_images
    from lite3r_recon import models
    from lite3r_recon.io import atomic_write_json, console, ensure_writable, rich_table
    from lite3r_recon.pointcloud import FORMATS, camera_centers, confidence_threshold, point_cloud, write_cloud

    t0 = time.perf_counter()
    out = Path(out)
    if mode not in ("crop", "pad"):
        raise InvalidInput(f"--mode {mode!r}: expected crop or pad")
    if size <= 0 or size % 14:
        raise InvalidInput(f"--size {size}: expected a positive multiple of 14 (the patch size)")
    if out.suffix.lower() not in FORMATS:
        raise InvalidInput(f"--out {out}: expected a .ply or .glb file")
    confidence_threshold(torch.zeros(1), conf_percentile)  # validates the percentile before any work
    ensure_writable(out, overwrite)
    if json_path is not None:
        json_path = Path(json_path)
        if json_path.resolve() == out.resolve():
            raise InvalidInput(f"--json {json_path}: the same file as --out")
        ensure_writable(json_path, overwrite)
    models.check_backbone(model)
    dev = models.resolve_device(device)
    files = resolve_inputs(inputs)
    con = console(quiet)
    times: dict[str, float] = {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=con, transient=True, disable=quiet) as progress:
        task = progress.add_task(f"loading {len(files)} images", total=5)
        t = time.perf_counter()
        images, _, pixels = load_images(files, mode=mode, size=size, with_mask=True)
        times["load_s"] = time.perf_counter() - t
        if net is None and weights is None:
            con.print(f"[yellow]no --weights: {model} has random weights (a smoke test, not a reconstruction)[/]")
        progress.update(task, advance=1, description=f"building {model}" + (" student" if student else ""))
        t = time.perf_counter()
        if net is None:
            net = models.load_model(model, weights=weights, student=student, device=dev)
        times["build_s"] = time.perf_counter() - t
        progress.update(task, advance=1, description=f"{model} forward on {len(files)} views")
        t = time.perf_counter()
        cams = predict(net, images.to(next(net.parameters()).device))
        times["forward_s"] = time.perf_counter() - t
        progress.update(task, advance=1, description="unprojecting depth")
        t = time.perf_counter()
        points, colours, stats, thr = point_cloud(images, cams, conf_percentile, pixels)
        times["unproject_s"] = time.perf_counter() - t
        progress.update(task, advance=1, description=f"writing {out}")
        t = time.perf_counter()
        write_cloud(out, points, colours, overwrite=overwrite)
        times["write_s"] = time.perf_counter() - t
        progress.update(task, advance=1)
    times["total_s"] = time.perf_counter() - t0
    centers = camera_centers(cams["extrinsics"])
    views = [{"image": str(f), **stats[i], "extrinsics_w2c": cams["extrinsics"][i], "intrinsics": cams["intrinsics"][i],
              "center": centers[i]} for i, f in enumerate(files)]
    summary = {"model": model, "student": str(student) if student else None,
               "weights": str(weights) if weights else None, "image_hw": list(images.shape[-2:]), "mode": mode,
               "size": size, "conf_percentile": conf_percentile, "conf_threshold": thr, "out": str(out),
               "views": len(files), "points_total": sum(s["points_total"] for s in stats),
               "points_kept": int(points.shape[0]), "device": str(dev), "time": times,
               "convention": "extrinsics: world-to-camera [R|t], OpenCV axes (x right, y down, z forward); "
                             "intrinsics in pixels of the processed image_hw", "cameras": views}
    if json_path is not None:
        atomic_write_json(json_path, summary, overwrite=overwrite)
    if not quiet:
        rows = [{"view": Path(v["image"]).name, "kept": v["points_kept"], "of": v["points_total"],
                 "depth median": v["depth_median"], "conf median": v["conf_median"]} for v in views]
        con.print(rich_table(rows, title=f"{model}{' student' if student else ''}: {len(files)} views, "
                                         f"{tuple(images.shape[-2:])} px"))
        con.print(rich_table([{"views": len(files), "points kept": summary["points_kept"],
                               "of": summary["points_total"], "conf threshold": thr,
                               "time (s)": times["total_s"], "forward (s)": times["forward_s"]}]))
        con.print(f"wrote {out}" + (f" and {json_path}" if json_path is not None else ""))
    return summary


__all__ = ["predict", "reconstruct", "resolve_inputs"]
