"""`lite3r eval`: a backbone (dense, or a lite3r student) over a benchmark, with the field's metrics.

For every scene: `views` views (evenly spaced, deterministic) -> model -> backbones.to_cameras -> metrics against
the ground truth normalised the way the field does (frame 0 = world, unit mean distance of valid points to it):
  depth   AbsRel, delta < 1.25, RMSE after per-image least-squares scale        (blendedmvs, synthetic)
  pose    RRA/RTA @30/15/5/3, AUC @30/15/5/3 (VGGT protocol, all pairs)         (all)
  points  accuracy, completeness, Chamfer, F-score after Umeyama Sim(3)          (blendedmvs, synthetic)
The point clouds: predicted depth unprojected with the predicted cameras vs GT depth with GT cameras, aligned by
Sim(3) on pixel correspondences, then subsampled to `max_points` each for the KD-tree search.

"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

from lite3r_recon.errors import InvalidInput, MissingInput

DEFAULT_SYNTHETIC = {"num": 2, "size": (126, 168), "seed": 1000}  # the embedded default: small, fast on CPU


def evaluate(model_name: str, *, dataset: str = "synthetic", data: str | os.PathLike | None = None, views: int = 4,
             weights: str | os.PathLike | None = None, student: str | os.PathLike | None = None,
             size: int | tuple[int, int] | None = None, max_scenes: int | None = None, device: str | None = None,
             json_path: str | os.PathLike | None = None, overwrite: bool = False, quiet: bool = False,
             threshold: float = 0.05, seed: int = 0) -> dict:
    """What `lite3r eval` does; returns {"config", "scenes": [per-scene rows], "mean": {metric: value},
    "groups": {group: [metrics]}, "seconds"}."""
    import numpy as np
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from lite3r_recon import datasets
    from lite3r_recon.models import load_model, resolve_device, weights_note
    from lite3r_recon.scoring import GROUPS, evaluate_sample
    from lite3r_recon.io import atomic_write_json, console, ensure_writable, rich_table

    if views < 1:
        raise InvalidInput(f"--views must be >= 1, got {views}")
    if max_scenes is not None and max_scenes < 1:
        raise InvalidInput(f"--max-scenes must be >= 1, got {max_scenes}")
    if json_path:
        ensure_writable(json_path, overwrite)  # fail before the long run, not after
    device = resolve_device(device)
    if dataset == "synthetic" and data is None:
        ds = datasets.open_dataset("synthetic", None, size=size or DEFAULT_SYNTHETIC["size"],
                                   num=max_scenes or DEFAULT_SYNTHETIC["num"], seed=DEFAULT_SYNTHETIC["seed"])
    else:
        if data is not None and not Path(data).exists():
            raise MissingInput(f"--data {data}: no such folder")
        ds = datasets.open_dataset(dataset, data, size=size or 518)
    n = min(len(ds), max_scenes) if max_scenes else len(ds)
    model = load_model(model_name, weights=weights, student=student, device=device, seed=seed)
    con = console(quiet)
    note = weights_note(model_name, weights)
    if note:
        con.print(f"[yellow]{note}[/]")
    rows, t0 = [], time.perf_counter()
    with Progress(TextColumn("[bold blue]eval"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=con, disable=quiet) as progress:
        task = progress.add_task("eval", total=n, info="")
        bad: set[int] = set()
        for i in range(n):
            sample = datasets.sample_or_skip(ds, i, views, normalize=True, bad=bad, total=n)
            if sample is None:
                progress.update(task, advance=1, info=f"skipped {len(bad)}")
                continue
            row = evaluate_sample(model, sample, device=device, threshold=threshold, seed=seed)
            rows.append({"scene": sample["scene"], **row})
            hw = list(sample["images"].shape[-2:])
            info = " ".join(f"{k} {row[k]:.3g}" for k in ("auc30", "abs_rel") if k in row)
            progress.update(task, advance=1, info=info)
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "scene"))
    mean = {k: float(np.nanmean([r.get(k, math.nan) for r in rows])) for k in keys}
    groups = {g: [k for k in ks if k in mean] for g, ks in GROUPS.items()}
    groups = {g: ks for g, ks in groups.items() if ks}
    result = {"config": {"model": model_name, "student": str(student) if student else None,
                         "weights": str(weights) if weights else None, "dataset": dataset,
                         "data": str(data) if data else None, "views": views, "scenes": n, "device": str(device),
                         "size": hw if rows else None, "threshold": threshold,
                         "skipped": sorted(ds.scenes[i].name if hasattr(ds, "scenes") else i for i in bad)},
              "mean": mean, "groups": groups, "scenes": rows, "seconds": round(time.perf_counter() - t0, 2)}
    title = f"{model_name}{' student' if student else ''} on {dataset} ({n} scenes x {views} views)"
    for g, ks in groups.items():
        con.print(rich_table([{"scene": r["scene"], **{k: r.get(k) for k in ks}} for r in rows]
                             + [{"scene": "mean", **{k: mean[k] for k in ks}}], title=f"{g}: {title}"))
    if json_path:
        atomic_write_json(json_path, result, overwrite=overwrite)
        con.print(f"wrote {json_path}")
    return result

