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
from typing import TYPE_CHECKING, Any

from lite3r_recon.errors import InvalidInput, MissingInput

if TYPE_CHECKING:  # annotations only: torch is imported inside the functions
    from torch import Tensor, nn


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


def predict(model: nn.Module, images: Tensor, **inputs) -> dict[str, Tensor]:
    """Backbone forward of one scene images [S,3,H,W] (bf16 autocast on CUDA) -> to_cameras output without the
    batch axis, float32 on the CPU, plus the tracks (track, vis, conf) when `inputs` has VGGT's query_points."""
    from lite3r_backbones import to_cameras
    from lite3r_recon import models

    out = models.infer(model, images[None], **inputs)
    cams = to_cameras(model, out, images.shape[-2:])
    keys = ("extrinsics", "intrinsics", "depth", "depth_conf")
    return {k: (cams if k in keys else out)[k][0].detach().float().cpu()
            for k in keys + tuple(k for k in ("track", "vis", "conf") if k in out)}


# ------------------------------------------------------------------------------------------------ command
def reconstruct(inputs: Sequence[str | os.PathLike], *, model: str = "vggt-1b",
                weights: str | os.PathLike | None = None, student: str | os.PathLike | None = None,
                size: int = 518, mode: str = "crop", conf_percentile: float = 50.0,
                out: str | os.PathLike = "scene.ply", json_path: str | os.PathLike | None = None,
                overwrite: bool = False, device: str | None = None, quiet: bool = False,
                colmap: str | os.PathLike | None = None, colmap_text: bool = False, ba: bool = False,
                tracks: int | None = None, fps: float = 1.0, max_views: int | None = None,
                intrinsics: str | os.PathLike | None = None, cameras: str | os.PathLike | None = None,
                preview: bool = True, net: nn.Module | None = None) -> dict[str, Any]:
    """Run the whole command; returns the summary written to `json_path` (cameras, per-view stats, timings).
    `net`: an already built backbone / student to use instead of building `model` (its name must be `model`).

    Videos among the inputs are sampled at `fps` (at most `max_views` frames) into <out stem>_frames/ beside
    `out`; `max_views` also caps the views in all (evenly kept). `intrinsics` (JSON or COLMAP model, original
    image pixels) replaces the predicted intrinsics in the exported geometry; `cameras` (with poses; DA3 only)
    conditions DA3 on them and exports them, the depth scaled to their units. `colmap` writes a COLMAP model
    (binary, or text with `colmap_text`) of the original images: the kept pixels (at most 100,000) seen once, or
    with `tracks` (VGGT's tracking head; 512 when `ba` asks for none) the tracks of a grid of frame-0 queries;
    `ba` bundle-adjusts that model through pycolmap. `preview` writes <out stem>.png beside `out`."""
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
    family = model.split("-")[0]
    n_tracks = tracks if tracks is not None else (512 if ba else 0)
    if n_tracks < 0 or (n_tracks and family != "vggt"):
        raise InvalidInput(f"--tracks {n_tracks}: expected >= 0 query points, and a VGGT model (its tracking head)"
                           + (f", not {model}" if family != "vggt" else ""))
    if ba and colmap is None:
        raise InvalidInput("--ba: bundle adjustment refines the COLMAP model: give --colmap DIR")
    if cameras is not None and (intrinsics is not None or family != "da3"):
        raise InvalidInput(f"--cameras: poses condition DA3 models only (not {model}), and replace --intrinsics"
                           if family != "da3" else "--cameras: already holds the intrinsics; drop --intrinsics")
    if colmap is not None:
        from lite3r_recon.colmap import check_destination

        check_destination(Path(colmap), overwrite)
    preview_path = out.with_suffix(".png") if preview else None
    if preview_path is not None:
        ensure_writable(preview_path, overwrite)
    from lite3r_recon.video import expand_videos

    files, videos = expand_videos(files, out.parent / f"{out.stem}_frames", fps, max_views, overwrite=overwrite)
    for video, n in videos.items():
        con.print(f"{video}: {n} frames at {fps:g} fps into {out.parent / (out.stem + '_frames')}")

    times: dict[str, float] = {}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=con, transient=True, disable=quiet) as progress:
        task = progress.add_task(f"loading {len(files)} images", total=5)
        t = time.perf_counter()
        # identity intrinsics in -> the map from original to network pixels out (resize, crop, padding)
        images, pixel_map, pixels = load_images(files, mode=mode, size=size, with_mask=True,
                                                intrinsics=torch.eye(3).expand(len(files), 3, 3))
        from PIL import Image

        sizes = [Image.open(f).size for f in files]  # (width, height) of the originals: COLMAP, known cameras
        known = None
        if intrinsics is not None or cameras is not None:
            from lite3r_recon.cameras_io import load_known_cameras

            known = load_known_cameras(cameras or intrinsics, [str(f) for f in files], sizes,
                                       poses=cameras is not None,
                                       flag="--cameras" if cameras is not None else "--intrinsics")
        times["load_s"] = time.perf_counter() - t
        note = models.weights_note(model, weights) if net is None else None
        if note:
            con.print(f"[yellow]{note}[/]")
        elif net is None and weights is None:
            from lite3r_backbones import shipped_weights

            con.print(f"no --weights: {model} with its shipped weights ({shipped_weights(model).name}, trained on "
                      f"synthetic scenes)")
        progress.update(task, advance=1, description=f"building {model}" + (" student" if student else ""))
        t = time.perf_counter()
        if net is None:
            net = models.load_model(model, weights=weights, student=student, device=dev)
        times["build_s"] = time.perf_counter() - t
        progress.update(task, advance=1, description=f"{model} forward on {len(files)} views")
        t = time.perf_counter()
        dev_net = next(net.parameters()).device
        extra: dict[str, Any] = {}
        if n_tracks:
            from lite3r_recon.colmap import grid_queries

            extra["query_points"] = grid_queries(pixels[0], n_tracks).to(dev_net)
        if known is not None and known["extrinsics"] is not None:  # DA3 conditioned through cam_enc
            extra.update(extrinsics=known["extrinsics"].float()[None].to(dev_net),
                         intrinsics=(pixel_map.double() @ known["intrinsics"]).float()[None].to(dev_net))
        from lite3r_recon.timing import cpu_estimate, long_note

        note = long_note(f"{model} forward on {len(files)} views", cpu_estimate(net, len(files), images.shape[-2:]))
        if note:  # the spinner alone would look hung for minutes
            con.print(f"[yellow]{note}[/]")
        cams = predict(net, images.to(dev_net), **extra)
        if known is not None:
            from lite3r_recon.cameras_io import apply_known_cameras

            scale = apply_known_cameras(cams, known, pixel_map)
            note = f" (depth scaled by {scale:.4g})" if known["extrinsics"] is not None else ""
            con.print(f"{'--cameras' if cameras is not None else '--intrinsics'}: the given cameras replace the "
                      f"predicted ones{note}")
        times["forward_s"] = time.perf_counter() - t
        progress.update(task, advance=1, description="unprojecting depth")
        t = time.perf_counter()
        points, colours, stats, thr = point_cloud(images, cams, conf_percentile, pixels)
        times["unproject_s"] = time.perf_counter() - t
        progress.update(task, advance=1, description=f"writing {out}")
        t = time.perf_counter()
        colmap_summary = scene = None
        if colmap is not None:  # built (and checked) before anything is written
            from lite3r_recon.colmap import scene_from_prediction, write_colmap

            keep = pixels & (cams["depth_conf"] >= thr) & torch.isfinite(cams["depth"]) & (cams["depth"] > 0)
            track = ({"query": extra["query_points"].cpu(), **{k: cams[k] for k in ("track", "vis", "conf")}}
                     if n_tracks else None)
            scene = scene_from_prediction([str(f) for f in files], sizes, pixel_map, images, cams, keep, tracks=track)
        write_cloud(out, points, colours, overwrite=overwrite)
        if scene is not None:
            colmap_summary = write_colmap(colmap, scene, binary=not colmap_text, bundle_adjust=ba,
                                          refine_focal_length=known is None, overwrite=overwrite)
        if preview_path is not None:
            from lite3r_recon.preview import write_preview

            write_preview(preview_path, images, cams["depth"], cams["depth_conf"], points, colours, cams["extrinsics"],
                          pixels=pixels, title=f"{model}: {len(files)} views", overwrite=overwrite)
        times["write_s"] = time.perf_counter() - t
        progress.update(task, advance=1)
    times["total_s"] = time.perf_counter() - t0
    centers = camera_centers(cams["extrinsics"])
    from lite3r_recon.colmap import model_to_original

    K_orig = model_to_original(pixel_map, cams["intrinsics"]).float()
    views = [{"image": str(f), **stats[i], "extrinsics_w2c": cams["extrinsics"][i], "intrinsics": cams["intrinsics"][i],
              "center": centers[i], "image_size": list(sizes[i]), "intrinsics_original": K_orig[i]}
             for i, f in enumerate(files)]
    summary = {"model": model, "student": str(student) if student else None,
               "weights": str(weights) if weights else None, "image_hw": list(images.shape[-2:]), "mode": mode,
               "size": size, "conf_percentile": conf_percentile, "conf_threshold": thr, "out": str(out),
               "views": len(files), "points_total": sum(s["points_total"] for s in stats),
               "points_kept": int(points.shape[0]), "device": str(dev), "time": times,
               "convention": "extrinsics: world-to-camera [R|t], OpenCV axes (x right, y down, z forward); "
                             "intrinsics in pixels of the processed image_hw, intrinsics_original in pixels of the "
                             "original image (image_size: width, height); pixel centres at integers",
               "cameras": views,
               "colmap": colmap_summary, "preview": str(preview_path) if preview_path else None,
               "videos": videos, "known_cameras": str(cameras or intrinsics) if known is not None else None}
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
        con.print(f"wrote {out}" + (f" and {json_path}" if json_path is not None else "")
                  + (f", {preview_path}" if preview_path is not None else ""))
        if colmap_summary is not None:
            errors = colmap_summary["reprojection_error_px"], colmap_summary.get("reprojection_error_px_after_ba")
            ba_note = f", reprojection error {errors[0]:.3g} -> {errors[1]:.3g} px after adjustment" if ba else ""
            con.print(f"wrote COLMAP model {colmap} ({colmap_summary['format']}): {colmap_summary['images']} images, "
                      f"{colmap_summary['points3D']} points{ba_note}")
    return summary


__all__ = ["predict", "reconstruct", "resolve_inputs"]
