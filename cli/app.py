"""`lite3r` command line: parses options and calls the command modules; no logic of its own.

One source of truth: each command's defaults are its work function's (cli/<command>.py, read with `_defaults`;
`lite3r train`'s are TrainConfig's), options shared by several commands are defined once below, and every command
names its backbone the same way - a family (vggt, da3: the full model with real weights, else the tiny one) or a
backbone name (vggt-tiny, vggt-1b, da3-tiny, da3-large, ...). The project's own errors (lite3r_recon.errors) become
one red line and exit code 2; anything else is a bug and keeps its traceback; LITE3R_DEBUG=1 shows every traceback.
The command modules import torch only inside their functions, so `--help` and bad options answer at once.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lite3r_cli import evaluate as _evaluate
from lite3r_cli import export as _export
from lite3r_cli import reconstruct as _reconstruct
from lite3r_cli.bench import BenchConfig as _BenchConfig
from lite3r_recon.train_config import RESUMABLE as _TRAIN_RESUMABLE
from lite3r_recon.train_config import TrainConfig as _TrainConfig

app = typer.Typer(
    name="lite3r",
    help="Make dense 3D reconstruction transformers (VGGT, Depth Anything 3) fast and small: "
    "Sparse-Linear Attention + FP8 QAT with partial attention distillation, and an FP8 + fused-SLA deployment path.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _defaults(fn) -> dict[str, Any]:
    """The defaults of a function's signature or of a dataclass's fields: the one place each default is written."""
    if dataclasses.is_dataclass(fn):
        return {f.name: f.default for f in dataclasses.fields(fn) if f.default is not dataclasses.MISSING}
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


_TRAIN, _BENCH = _defaults(_TrainConfig), _defaults(_BenchConfig)
_RECON, _EVAL, _EXPORT = _defaults(_reconstruct.reconstruct), _defaults(_evaluate.evaluate), _defaults(_export.export)

# ---- options shared by several commands: defined once
MODEL_HELP = ("backbone: a family (vggt, da3: the full model when real weights are given, else the tiny one) or a "
              "backbone name (vggt-tiny, vggt-1b, da3-tiny, da3-large, vggt-small, da3-small)")
ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP, show_default=True)]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
WeightsOpt = Annotated[Optional[Path], typer.Option(help="dense checkpoint (.safetensors / .pt), loaded strictly, or "
                                                         "'random' (default: the backbone's shipped weights, else "
                                                         "random); with --student: where the teacher it records is "
                                                         "now (checked by sha256)")]
StudentOpt = Annotated[Optional[Path], typer.Option(help="lite3r student: the run folder of `lite3r train` or its "
                                                         "student.safetensors, on the teacher it records; or a `lite3r "
                                                         "export` artifact, run as exported (absent: the dense model)")]
TopkOpt = Annotated[float, typer.Option(help="SLA kept fraction of key blocks per query block, in (0, 1]")]
KeptBlocksOpt = Annotated[Optional[int], typer.Option(help="SLA kept key blocks per query block, a count instead of "
                                                           "--topk (sparse cost linear in the views)")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cuda / cpu (default: cuda when available)")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="also write the results as JSON here")]
OverwriteOpt = Annotated[bool, typer.Option(help="replace existing output files (never done without it)")]
QuietOpt = Annotated[bool, typer.Option(help="no progress bar or tables")]
RESUME_HELP = ("continue the run in --out with its saved config, from its latest checkpoint (a run killed before its "
               "first checkpoint restarts from step 0); an option that contradicts the saved config is an error, "
               "except {}; no run in --out is an error").format


def _flags(names) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def _full(model: str, weights) -> str:
    """MODEL as every command reads it (lite3r_recon.train_config.resolve_backbone)."""
    from lite3r_recon.train_config import resolve_backbone

    return resolve_backbone(model, full=weights is not None and str(weights) != "random")


def _given(ctx: typer.Context, name: str) -> bool:
    return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"


# ---------------------------------------------------------------------------------------------------- bench
class BenchTarget(str, Enum):
    kernels = "kernels"
    attention = "attention"


@app.command()
def bench(
    target: Annotated[str, typer.Argument(help=f"what to measure: a model ({MODEL_HELP}; on CUDA a family is its full "
                                               "model) through paths (a)-(d); kernels: the kernel benchmarks; "
                                               "attention: one global attention layer, SDPA vs SLA")] = _BENCH["model"],
    views: Annotated[str, typer.Option(help="views per scene; a comma list (8,32,128) sweeps them")] =
        ",".join(map(str, _BENCH["views"])),
    res: Annotated[Optional[int], typer.Option(help="square image size in pixels, a multiple of 14 (default: 518 on "
                                                    "CUDA, 140 for the tiny config on CPU)")] = _BENCH["res"],
    topk: TopkOpt = _BENCH["topk"],
    kept_blocks: KeptBlocksOpt = _BENCH["kept_blocks"],
    weights: WeightsOpt = _BENCH["weights"],
    student: Annotated[Optional[Path], typer.Option(help="trained student (run folder or student.safetensors; every "
                                                         "path then runs its recorded teacher) or a `lite3r export` "
                                                         "artifact for path (d)")] = _BENCH["student"],
    repeats: Annotated[Optional[int], typer.Option(help="timed runs per path, the median is reported (default: 3 on "
                                                        "CUDA, 1 on CPU)")] = _BENCH["repeats"],
    warmup: Annotated[Optional[int], typer.Option(help="untimed runs first: compile, autotune, CUDA-graph capture "
                                                       "(default: 2 on CUDA, 1 on CPU)")] = _BENCH["warmup"],
    variants: Annotated[str, typer.Option(help="paths to run, comma separated: a,b,c,d (and bf16-all, bf16-lean: "
                                               "eager bf16 with all vs only the head layers kept)")] =
        ",".join(_BENCH["variants"]),
    compile_mode: Annotated[str, typer.Option(help="torch.compile mode for (b)-(d): default, "
                                                   "max-autotune-no-cudagraphs, reduce-overhead, or none")] =
        _BENCH["compile_mode"] or "none",
    compile_sla: Annotated[bool, typer.Option("--compile-sla/--eager-sla", help="trace the SLA kernels into the "
                                                                                "compiled blocks (--eager-sla: run "
                                                                                "them eagerly inside them)")] =
        _BENCH["compile_sla"],
    dense_max_views: Annotated[Optional[int], typer.Option(help="dense paths (a, b, bf16-*) at more views than this "
                                                                "are not run: their latency is estimated from the "
                                                                "measured per-layer cost, marked est.")] =
        _BENCH["dense_max_views"],
    kept_fp8: Annotated[bool, typer.Option(help="(d): the aggregator layers the heads read kept in FP8 with "
                                                "per-token scales (half their memory; error QAT did not train for)")] =
        _BENCH["kept_fp8"],
    head_frames: Annotated[Optional[int], typer.Option(help="(b)-(d): the DPT heads over this many frames at a time "
                                                           "(default: the model's 8; fewer: less memory, more "
                                                           "launches)")] = _BENCH["head_frames"],
    chunk_tokens: Annotated[Optional[int], typer.Option(help="(b)-(d): MLPs and attention projections over this "
                                                            "many tokens at a time (default 65536; fewer: lower "
                                                            "peak memory, more launches)")] = _BENCH["chunk_tokens"],
    device: DeviceOpt = _BENCH["device"],
    json_out: JsonOpt = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG of latency and memory against views")] = None,
    profile: Annotated[bool, typer.Option(help="also profile each path: GPU time by kernel category, by module "
                                               "and by kernel, paths side by side")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Latency and peak memory of (a) the official dense model, (b) our best dense path, (c) SLA, (d) SLA + FP8,
    with speed-up / memory ratios and the output difference vs (a). On CPU: the tiny config, eager."""
    from lite3r_cli import bench as _bench

    special = target in {t.value for t in BenchTarget}
    cfg = _bench.BenchConfig(
        model=_BENCH["model"] if special else target, views=_bench.parse_views(views), res=res, topk=topk,
        kept_blocks=kept_blocks,
        repeats=repeats, warmup=warmup, variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        compile_mode=None if compile_mode == "none" else compile_mode, compile_sla=compile_sla,
        dense_max_views=dense_max_views, kept_fp8=kept_fp8, head_frames=head_frames, chunk_tokens=chunk_tokens,
        weights=str(weights) if weights else None,
        student=str(student) if student else None, device=device)
    _bench.main(target if special else "model", cfg, json_path=json_out, plot_path=plot, profile=profile,
                overwrite=overwrite)


# ---------------------------------------------------------------------------------------------------- export
@app.command()
def export(
    student: Annotated[Optional[Path], typer.Argument(help="trained student: the run folder of lite3r train or its "
                                                           "student.safetensors (omit: a fresh, untrained student)")]
    = _EXPORT["student"],
    out: Annotated[Path, typer.Option(help="the deploy artifact to write (a .safetensors file)")] =
        Path(_EXPORT["out"]),
    model: ModelOpt = _EXPORT["model"],
    weights: WeightsOpt = _EXPORT["weights"],
    topk: Annotated[float, typer.Option(help="SLA kept fraction of key blocks (fresh student only)")] =
        _EXPORT["topk"],
    kept_blocks: KeptBlocksOpt = _EXPORT["kept_blocks"],
    scope: Annotated[str, typer.Option(help="attention made SLA, global or all (fresh student only)")] =
        _EXPORT["scope"],
    fp8: Annotated[bool, typer.Option(help="FP8 E4M3 linear weights with per-row scales (fresh student only)")] =
        _EXPORT["fp8"],
    overwrite: OverwriteOpt = _EXPORT["overwrite"],
) -> None:
    """Write the deployable artifact of a student: FP8 weights + scales, the rest in bf16, the SLA settings (and the
    SLAConfig it was built with) and the backbone config in one safetensors file;
    lite3r_recon.models.load_artifact rebuilds it without teacher or QAT model."""
    config = _export.export(student, out=out, model=_full(model, weights), weights=weights, topk=topk, scope=scope,
                            fp8=fp8, overwrite=overwrite, kept_blocks=kept_blocks)
    typer.echo(f"wrote {out}: {config['backbone']}, {len(config['sla'])} SLA modules, "
               f"{config['fp8_linears']} FP8 linears")


# ---------------------------------------------------------------------------------------------------- train
@app.command()
def train(
    ctx: typer.Context,
    model: ModelArg = _TRAIN["model"],
    teacher: Annotated[Optional[Path], typer.Option(help="dense teacher checkpoint (.safetensors/.pt); absent: the "
                                                         "backbone's shipped weights, or random ones from --seed")] = None,
    size: Annotated[Optional[str], typer.Option(help="tiny or full, for a family MODEL (default: full with "
                                                     "--teacher, else tiny)")] = None,
    data: Annotated[Optional[Path], typer.Option(help="dataset root; absent with synthetic: scenes rendered "
                                                      "on the fly")] = None,
    dataset: Annotated[str, typer.Option(help="synthetic or blendedmvs")] = _TRAIN["dataset"],
    out: Annotated[Path, typer.Option(help="run directory: checkpoints, student.safetensors, metrics.json, "
                                           "loss.png")] = Path("runs/train"),
    scenes: Annotated[Optional[int], typer.Option(help="distinct training scenes, cycled; 0: a new scene for every "
                                                       "sample (default: 16 synthetic on the fly, 0 with --data)")] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps in all")] = _TRAIN["steps"],
    batch: Annotated[int, typer.Option(help="scenes per step over all processes")] = _TRAIN["batch"],
    views: Annotated[int, typer.Option(help="views per scene")] = _TRAIN["views"],
    res: Annotated[Optional[str], typer.Option(help="image size H,W or one size, multiples of 14 "
                                                    "(default: 126,168 tiny, 518 full)")] = None,
    optimizer: Annotated[str, typer.Option(help="adamw, or sgd (momentum 0.9)")] = _TRAIN["optimizer"],
    lr: Annotated[float, typer.Option(help="peak learning rate of proj_l")] = _TRAIN["lr"],
    trainable: Annotated[str, typer.Option(help="what trains: proj_l (SLA's new projections, the recipe) or "
                                                "attention (also the SLA layers' own qkv, norms and proj, at "
                                                "--lr-inherited)")] = _TRAIN["trainable"],
    lr_inherited: Annotated[float, typer.Option(help="peak learning rate of the inherited weights --trainable "
                                                     "attention trains")] = _TRAIN["lr_inherited"],
    warmup: Annotated[int, typer.Option(help="linear warm-up steps (then cosine to 10 %)")] = _TRAIN["warmup"],
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = _TRAIN["weight_decay"],
    grad_clip: Annotated[float, typer.Option(help="gradient norm clip (0: off)")] = _TRAIN["grad_clip"],
    lambda_kd: Annotated[float, typer.Option(help="weight of the attention distillation loss")] = _TRAIN["lambda_kd"],
    kd_norm: Annotated[bool, typer.Option(help="distil relative MSE (each layer's MSE over the teacher output's "
                                               "mean square)")] = _TRAIN["kd_norm"],
    target: Annotated[Optional[str], typer.Option(help="task-loss target: gt (the scenes' geometry) or teacher (its "
                                                       "predictions) (default: gt; teacher for a random full-size "
                                                       "teacher)")] = None,
    distill: Annotated[str, typer.Option(help="attention outputs distilled: global (cross-view layers), all, or "
                                              "module indices like 0,5,11")] = _TRAIN["distill"],
    sla: Annotated[str, typer.Option(help="attention made SLA: global (cross-view) or all")] = _TRAIN["sla"],
    topk: TopkOpt = _TRAIN["topk"],
    kept_blocks: KeptBlocksOpt = _TRAIN["kept_blocks"],
    block: Annotated[int, typer.Option(help="SLA block size in tokens")] = _TRAIN["block"],
    feature_map: Annotated[str, typer.Option(help="SLA linear-branch feature map: softmax, elu, relu")] =
        _TRAIN["feature_map"],
    fp8: Annotated[bool, typer.Option(help="FP8 fake quant on the linears (QAT)")] = _TRAIN["fp8"],
    grad_ckpt: Annotated[bool, typer.Option(help="activation checkpointing per student block")] = _TRAIN["grad_ckpt"],
    w_camera: Annotated[float, typer.Option(help="task loss weight: camera")] = _TRAIN["w_camera"],
    w_depth: Annotated[float, typer.Option(help="task loss weight: depth")] = _TRAIN["w_depth"],
    w_point: Annotated[float, typer.Option(help="task loss weight: points")] = _TRAIN["w_point"],
    seed: Annotated[int, typer.Option(help="seed of a random teacher's weights and of the data order")] =
        _TRAIN["seed"],
    ckpt_every: Annotated[int, typer.Option(help="checkpoint every N steps (and at the end)")] = _TRAIN["ckpt_every"],
    eval_scenes: Annotated[int, typer.Option(help="held-out scenes for teacher vs student metrics")] =
        _TRAIN["eval_scenes"],
    resume: Annotated[bool, typer.Option(help=RESUME_HELP(_flags(_TRAIN_RESUMABLE)))] = False,
    overwrite: Annotated[bool, typer.Option(help="replace the run in --out")] = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    stop_after: Annotated[Optional[int], typer.Option(hidden=True, help="stop after this step as if killed")] = None,
) -> None:
    """FP8-aware QAT of an SLA student with partial attention distillation from its frozen dense teacher. With no
    --teacher and no --data: the embedded default (tiny architecture, its shipped teacher, synthetic scenes on the
    fly; a few minutes on CPU). Under `torchrun --nproc_per_node=N` it trains with DDP."""
    from lite3r_recon.train_config import parse_res

    fields = {"teacher": str(teacher) if teacher else None, "size": size, "data": str(data) if data else None,
              "dataset": dataset, "scenes": scenes, "steps": steps, "batch": batch, "views": views,
              "res": parse_res(res) if res else None, "optimizer": optimizer, "lr": lr, "trainable": trainable,
              "lr_inherited": lr_inherited, "warmup": warmup,
              "weight_decay": weight_decay, "grad_clip": grad_clip, "lambda_kd": lambda_kd, "kd_norm": kd_norm,
              "target": target, "distill": distill, "sla": sla, "topk": topk, "block": block,
              "kept_blocks": kept_blocks,
              "feature_map": feature_map, "fp8": fp8, "grad_ckpt": grad_ckpt, "w_camera": w_camera,
              "w_depth": w_depth, "w_point": w_point, "seed": seed, "ckpt_every": ckpt_every,
              "eval_scenes": eval_scenes, "model": model}
    explicit = {k for k in fields if _given(ctx, k)}
    cfg = _TrainConfig(**fields)  # validates before torch is imported
    from lite3r_recon import qat as _train

    _train.train(cfg, out, resume=resume, overwrite=overwrite, device=device, quiet=quiet,
                 explicit=explicit, stop_after=stop_after)


# ---------------------------------------------------------------------------------------------------- reconstruct
@app.command()
def reconstruct(
    images: Annotated[list[Path], typer.Argument(help="image files, folders of images (sorted by name) and/or videos")],
    model: ModelOpt = _RECON["model"],
    weights: WeightsOpt = _RECON["weights"],
    student: StudentOpt = _RECON["student"],
    size: Annotated[int, typer.Option(help="image size in pixels (width in crop mode, longer side in pad mode), "
                                           "a multiple of 14")] = _RECON["size"],
    mode: Annotated[str, typer.Option(help="crop (width to --size, centre-crop the height) or pad (longer side to "
                                           "--size, pad to a square)")] = _RECON["mode"],
    conf_percentile: Annotated[float, typer.Option(help="drop the points whose confidence is below this percentile "
                                                        "over all views, in [0, 100)")] = _RECON["conf_percentile"],
    out: Annotated[Path, typer.Option(help="point cloud to write, .ply or .glb")] = Path(_RECON["out"]),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write cameras (w2c OpenCV extrinsics, "
                                                                    "intrinsics) and per-view stats here")] = None,
    overwrite: OverwriteOpt = _RECON["overwrite"],
    device: DeviceOpt = _RECON["device"],
    quiet: QuietOpt = _RECON["quiet"],
    colmap: Annotated[Optional[Path], typer.Option(help="also write a COLMAP sparse model (cameras, images, points3D "
                                                        "of the original images) into this folder")] = None,
    colmap_text: Annotated[bool, typer.Option(help="COLMAP text files instead of binary")] = _RECON["colmap_text"],
    ba: Annotated[bool, typer.Option("--ba", help="bundle-adjust the COLMAP model (pycolmap) on VGGT's point "
                                                  "tracks")] = _RECON["ba"],
    tracks: Annotated[Optional[int], typer.Option(help="track this many frame-0 grid points with VGGT's tracking head "
                                                       "into the COLMAP model (default: 512 with --ba, else none)")] = None,
    fps: Annotated[float, typer.Option(help="frames per second sampled from video inputs")] = _RECON["fps"],
    max_views: Annotated[Optional[int], typer.Option(help="at most this many views (video frames and images, "
                                                           "evenly kept)")] = None,
    intrinsics: Annotated[Optional[Path], typer.Option(help="known intrinsics of the original images (JSON or a "
                                                            "COLMAP model folder), used instead of the predicted ones")] = None,
    cameras: Annotated[Optional[Path], typer.Option(help="known cameras with poses (JSON or COLMAP model): condition "
                                                         "DA3 on them and export them")] = None,
    preview: Annotated[bool, typer.Option(help="write <out stem>.png: depth and confidence per view, a top view of "
                                               "the points and cameras")] = _RECON["preview"],
) -> None:
    """Reconstruct a scene (images, folders or videos): predicted depth unprojected with the predicted (or given)
    cameras into a coloured world-space point cloud (low-confidence points dropped), the cameras as JSON, a
    preview PNG, and optionally a COLMAP model (bundle-adjusted on VGGT's tracks with --ba)."""
    _reconstruct.reconstruct(images, model=_full(model, weights), weights=weights, student=student, size=size,
                             mode=mode, conf_percentile=conf_percentile, out=out, json_path=json_out,
                             overwrite=overwrite, device=device, quiet=quiet, colmap=colmap, colmap_text=colmap_text,
                             ba=ba, tracks=tracks, fps=fps, max_views=max_views, intrinsics=intrinsics,
                             cameras=cameras, preview=preview)


# ---------------------------------------------------------------------------------------------------- eval
class EvalDataset(str, Enum):
    blendedmvs = "blendedmvs"
    dtu64 = "dtu64"
    synthetic = "synthetic"


@app.command("eval")
def eval_(
    model: ModelArg,
    data: Annotated[Optional[Path], typer.Option(help="dataset root (default with --dataset synthetic: scenes "
                                                      "generated in memory)")] = _EVAL["data"],
    dataset: Annotated[EvalDataset, typer.Option(help="benchmark format")] = EvalDataset(_EVAL["dataset"]),
    views: Annotated[int, typer.Option(help="views per scene (evenly spaced)")] = _EVAL["views"],
    weights: WeightsOpt = _EVAL["weights"],
    student: StudentOpt = _EVAL["student"],
    size: Annotated[Optional[int], typer.Option(help="image width, multiple of 14 (default: 518; embedded "
                                                     "synthetic: 126x168)")] = _EVAL["size"],
    max_scenes: Annotated[Optional[int], typer.Option(help="evaluate at most N scenes (embedded synthetic: N "
                                                           "scenes, default 2)")] = _EVAL["max_scenes"],
    json_out: JsonOpt = None,
    device: DeviceOpt = _EVAL["device"],
    overwrite: OverwriteOpt = _EVAL["overwrite"],
    quiet: QuietOpt = _EVAL["quiet"],
) -> None:
    """Evaluate a backbone (or a lite3r student) on BlendedMVS, DTU64 or synthetic scenes: depth AbsRel /
    delta<1.25 / RMSE, pose RRA/RTA and AUC@30/15/5/3, point-cloud accuracy / completeness / Chamfer / F-score."""
    _evaluate.evaluate(_full(model, weights), dataset=dataset.value, data=data, views=views, weights=weights,
                       student=student, size=size, max_scenes=max_scenes, device=device, json_path=json_out,
                       overwrite=overwrite, quiet=quiet)


# ---------------------------------------------------------------------------------------------------- make-scenes
@app.command("make-scenes")
def make_scenes(
    out: Annotated[Path, typer.Argument(help="folder for the scenes (scene_0000, ...), BlendedMVS layout")],
    num: Annotated[int, typer.Option(help="number of scenes")] = 100,
    views: Annotated[int, typer.Option(help="views per scene")] = 16,
    size: Annotated[int, typer.Option(help="image height and width in pixels")] = 518,
    seed: Annotated[int, typer.Option(help="seed of the first scene (scene k uses seed + k)")] = 0,
    overwrite: Annotated[bool, typer.Option(help="re-render scenes already in OUT")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Render procedural multi-view scenes with exact depth (ray cast in torch), written as BlendedMVS scenes:
    blended_images/*.jpg, cams/*_cam.txt + pair.txt, rendered_depth_maps/*.pfm. Deterministic per seed."""
    from lite3r_recon import synthetic as _synthetic

    _synthetic.make_scenes(out, num=num, views=views, size=size, seed=seed, overwrite=overwrite, quiet=quiet)


# --- pretrain / study (cli/pretrain.py, cli/study.py): dense teachers from scratch and the quality table on them ---
class PretrainFamily(str, Enum):
    vggt = "vggt"
    da3 = "da3"


@app.command()
def pretrain(
    family: Annotated[PretrainFamily, typer.Argument(help="backbone family of the teacher")],
    size: Annotated[Optional[str], typer.Option(help="tiny (vggt-tiny / da3-tiny) or small (vggt-small / da3-small) "
                                                     "(default tiny)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (default 2000)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="new synthetic scenes per step (default 16)")] = None,
    views: Annotated[Optional[int], typer.Option(help="views per scene (default 4)")] = None,
    res: Annotated[Optional[str], typer.Option(help="H,W or one size, multiples of 14 (default 126,168 tiny, "
                                                    "252 small)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak AdamW learning rate (default 1e-3)")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="linear warm-up steps, then cosine to 10 % (default 100)")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay (default 0.05)")] = None,
    arc: Annotated[Optional[str], typer.Option(help="MIN,MAX degrees the cameras of a training scene span (default "
                                                    "90,200; held-out scenes keep the default)")] = None,
    sky: Annotated[Optional[str], typer.Option(help="sky of the training scenes: plain (the default and the "
                                                    "held-out scenes') or compass (fixed to the world: a heading cue)")] = None,
    fov_init: Annotated[Optional[float], typer.Option(help="VGGT: the field of view (radians) the camera head starts "
                                                         "at, keeping its ReLU'd fov outputs alive; 0: plain init "
                                                         "(default 1.0)")] = None,
    w_camera: Annotated[Optional[float], typer.Option(help="camera loss weight (default 5)")] = None,
    w_depth: Annotated[Optional[float], typer.Option(help="depth loss weight (default 1)")] = None,
    w_point: Annotated[Optional[float], typer.Option(help="point loss weight (default 1)")] = None,
    w_track: Annotated[Optional[float], typer.Option(help="VGGT: tracking loss weight, a correspondence signal from "
                                                          "the scenes' exact tracks (default 0: off)")] = None,
    track_points: Annotated[Optional[int], typer.Option(help="VGGT: query pixels of view 0 per scene for the "
                                                             "tracking loss (default 64)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="init and data seed (default 0)")] = None,
    init: Annotated[Optional[str], typer.Option(help="start from these weights instead of a random init: a "
                                                     "teacher.safetensors, or 'shipped' (the shipped tiny teacher); "
                                                     "fresh optimizer and schedule, so pass a new --seed")] = None,
    ckpt_every: Annotated[Optional[int], typer.Option(help="checkpoint every N steps (default 250)")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="held-out curve point every N steps (default 250)")] = None,
    eval_scenes: Annotated[Optional[int], typer.Option(help="held-out scenes of the final metrics (default 16)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run folder (default runs/pretrain-FAMILY-SIZE)")] = None,
    resume: Annotated[bool, typer.Option(help=RESUME_HELP(_flags(_TRAIN_RESUMABLE + ("eval_every",))))] = False,
    overwrite: Annotated[bool, typer.Option(help="start over, replacing the run in --out")] = False,
    device: Annotated[Optional[str], typer.Option(help="cuda / cpu (default: cuda when available)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar or table")] = False,
) -> None:
    """Train a dense teacher from scratch with the backbone's own task loss on synthetic scenes (a new scene per
    sample, rendered on the device; held-out scenes by seed range): teacher.safetensors (fp16), metrics, plots."""
    from lite3r_cli import pretrain as _pretrain

    _pretrain.main(family.value, size=size, out=str(out) if out else None, resume=resume, overwrite=overwrite,
                   device=device, quiet=quiet, steps=steps, batch=batch, views=views, res=res, lr=lr,
                   warmup=warmup, weight_decay=weight_decay, arc=arc, sky=sky, fov_init=fov_init,
                   w_camera=w_camera, w_depth=w_depth, w_point=w_point, w_track=w_track, track_points=track_points,
                   seed=seed, init=init, ckpt_every=ckpt_every, eval_every=eval_every, eval_scenes=eval_scenes)


class StudyDataset(str, Enum):
    synthetic = "synthetic"
    blendedmvs = "blendedmvs"
    dtu64 = "dtu64"


@app.command()
def study(
    model: Annotated[str, typer.Argument(help="backbone: vggt-tiny (the shipped teacher), vggt-small, vggt-1b, "
                                              "da3-tiny, ...")] = "vggt-tiny",
    weights: Annotated[Optional[Path], typer.Option(help="dense teacher checkpoint (default: the shipped tiny "
                                                         "teacher)")] = None,
    dataset: Annotated[StudyDataset, typer.Option(help="held-out synthetic scenes, or a benchmark in --data")]
    = StudyDataset.synthetic,
    data: Annotated[Optional[Path], typer.Option(help="dataset root for blendedmvs / dtu64")] = None,
    scenes: Annotated[Optional[int], typer.Option(help="scenes evaluated (default 8)")] = None,
    views: Annotated[Optional[int], typer.Option(help="views per scene (default 4)")] = None,
    size: Annotated[Optional[str], typer.Option(help="H,W or one size, multiples of 14 (default 126,168 tiny, 252 "
                                                     "small, 518 otherwise)")] = None,
    topk: Annotated[Optional[str], typer.Option(help="kept fractions, comma separated (default 0.3,0.1,0.05; the "
                                                     "last is the trained rows')")] = None,
    kept_blocks: Annotated[Optional[str], typer.Option(help="also untrained rows keeping these counts of key blocks "
                                                            "per query block, comma separated (e.g. 4,8,16)")] = None,
    block: Annotated[Optional[int], typer.Option(help="SLA block size in tokens (default 64)")] = None,
    student: Annotated[Optional[Path], typer.Option(help="a trained student (lite3r train's folder or "
                                                         "student.safetensors, or a `lite3r export` artifact) for "
                                                         "the QAT row")] = None,
    train_steps: Annotated[Optional[int], typer.Option(help="steps of each short lite3r train run (default 60)")] = None,
    train_batch: Annotated[Optional[int], typer.Option(help="scenes per step of those runs (default 2)")] = None,
    trainable: Annotated[Optional[str], typer.Option(help="what those runs train: proj_l (default) or attention "
                                                       "(the SLA layers' own weights too)")] = None,
    lr_inherited: Annotated[Optional[float], typer.Option(help="their peak learning rate of the inherited weights "
                                                               "with --trainable attention (default 1e-4)")] = None,
    target: Annotated[Optional[str], typer.Option(help="their task-loss target: gt (default) or teacher (its "
                                                       "predictions)")] = None,
    ablations: Annotated[bool, typer.Option(help="also the ablation rows (distill only, task only, sparse only, "
                                                 "linear only)")] = True,
    out: Annotated[Optional[Path], typer.Option(help="folder for study.json, study.png and the training runs "
                                                     "(default runs/study-MODEL)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda / cpu (default: cuda when available)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing study in --out")] = False,
    resume: Annotated[bool, typer.Option(help="go on with a study stopped in --out (its study.partial.json): rows "
                                              "measured are kept, training runs resumed")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar or table")] = False,
) -> None:
    """The quality table of SLA on a teacher: dense; SLA at each topk untrained, + FP8; after QAT + partial
    distillation; ablations. AUC@30/@5, RRA/RTA@5, AbsRel, delta1, Chamfer, F-score as a table, JSON and PNG."""
    from lite3r_cli import study as _study

    _study.main(model, out=str(out) if out else None, device=device, overwrite=overwrite, quiet=quiet, resume=resume,
                weights=str(weights) if weights else None, dataset=dataset.value, data=str(data) if data else None,
                scenes=scenes, views=views, size=size, topks=topk, kept_blocks=kept_blocks, block=block,
                student=str(student) if student else None, train_steps=train_steps, train_batch=train_batch,
                trainable=trainable, lr_inherited=lr_inherited, target=target, ablations=ablations)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The project's own error types (recon/errors.py, and the core's lite3r.Lite3rError when it is loaded)."""
    from lite3r_recon.errors import Lite3rError

    core = sys.modules.get("lite3r")
    return (Lite3rError,) + ((core.Lite3rError,) if core is not None else ())


def main() -> None:
    """Console entry point: the project's own errors (bad input) become one red line and exit code 2; anything
    else is a bug and shows its traceback. LITE3R_DEBUG=1 shows the traceback of every error. UserWarnings (lite3r's:
    a skipped scene, an old student file) print as one yellow `warning:` line, not as Python's file:line report."""
    import warnings

    python_report = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category is UserWarning and not os.environ.get("LITE3R_DEBUG"):
            typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)
        else:
            python_report(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        app()
    except Exception as err:
        if os.environ.get("LITE3R_DEBUG") or not isinstance(err, _user_errors()):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    finally:
        warnings.showwarning = python_report
