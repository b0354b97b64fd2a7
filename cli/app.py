"""`lite3r` command line: parses options and calls the library; no logic of its own.

Each subcommand lives in one function below; its signature is the single source of its defaults.
Known errors (bad paths, bad values, shape mismatches) become one red line and exit code 2;
set LITE3R_DEBUG=1 to see the full traceback instead.
"""
from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="lite3r",
    help="Make dense 3D reconstruction transformers (VGGT, Depth Anything 3) fast and small: "
    "Sparse-Linear Attention + FP8 QAT with partial attention distillation, and an FP8 + fused-SLA deployment path.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# --- commands are added below by the pieces that own them (train, eval, bench, make-scenes, reconstruct, export) ---


class BenchTarget(str, Enum):
    vggt = "vggt"
    da3 = "da3"
    kernels = "kernels"
    attention = "attention"


@app.command()
def bench(
    target: Annotated[BenchTarget, typer.Argument(help="vggt / da3: the whole model, paths (a)-(d); kernels: the "
                                                       "kernel benchmarks; attention: one global attention layer, "
                                                       "SDPA vs SLA")] = BenchTarget.vggt,
    views: Annotated[str, typer.Option(help="views per scene; a comma list (8,32,128) sweeps them")] = "32",
    res: Annotated[Optional[int], typer.Option(help="square image size in pixels, a multiple of 14 (default: 518 on "
                                                    "CUDA, 140 for the tiny config on CPU)")] = None,
    topk: Annotated[float, typer.Option(help="SLA kept fraction of key blocks on global attention")] = 0.05,
    weights: Annotated[Optional[Path], typer.Option(help="dense checkpoint (random weights when absent)")] = None,
    student: Annotated[Optional[Path], typer.Option(help="student.safetensors with trained proj_l for (c), (d)")] = None,
    repeats: Annotated[Optional[int], typer.Option(help="timed runs per path, the median is reported (default: 3 on "
                                                        "CUDA, 1 on CPU)")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="untimed runs first: compile, autotune, CUDA-graph capture "
                                                       "(default: 2 on CUDA, 1 on CPU)")] = None,
    variants: Annotated[str, typer.Option(help="paths to run, comma separated: a,b,c,d (and bf16-all, bf16-lean: "
                                               "eager bf16 with all vs only the head layers kept)")] = "a,b,c,d",
    compile_mode: Annotated[str, typer.Option(help="torch.compile mode for (b)-(d): default, "
                                                   "max-autotune-no-cudagraphs, reduce-overhead, or none")] = "default",
    compile_sla: Annotated[bool, typer.Option("--compile-sla/--eager-sla", help="trace the SLA kernels into the compiled blocks (--eager-sla: "
                                                   "run them eagerly inside them)")] = True,
    backbone: Annotated[Optional[str], typer.Option(help="backbone name instead of the family default "
                                                         "(e.g. vggt-tiny on a GPU)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cuda / cpu (default: cuda when available)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write all numbers as JSON here")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG of latency and memory against views")] = None,
    profile: Annotated[bool, typer.Option(help="also profile the last path (module + kernel breakdown)")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace existing --json / --plot files")] = False,
) -> None:
    """Latency and peak memory of (a) the official dense model, (b) our best dense path, (c) SLA, (d) SLA + FP8,
    with speed-up / memory ratios and the output difference vs (a). On CPU: the tiny config, eager."""
    from lite3r_cli import bench as _bench

    cfg = _bench.BenchConfig(
        model=backbone or (target.value if target in (BenchTarget.vggt, BenchTarget.da3) else "vggt"),
        views=_bench.parse_views(views), res=res, topk=topk, repeats=repeats, warmup=warmup,
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        compile_mode=None if compile_mode == "none" else compile_mode, compile_sla=compile_sla,
        weights=str(weights) if weights else None, student=str(student) if student else None, device=device)
    _bench.main(target.value if target in (BenchTarget.kernels, BenchTarget.attention) else "model", cfg,
                json_path=json_out, plot_path=plot, profile=profile, overwrite=overwrite)


@app.command()
def export(
    student: Annotated[Optional[Path], typer.Argument(help="trained student: DIR of lite3r train or its "
                                                           "student.safetensors (omit: a fresh, untrained student)")] = None,
    out: Annotated[Path, typer.Option(help="the deploy artifact to write")] = Path("model.lite3r.safetensors"),
    model: Annotated[str, typer.Option(help="backbone the student was trained on (vggt-1b, da3-large, vggt-tiny, ...)")]
    = "vggt-tiny",
    weights: Annotated[Optional[Path], typer.Option(help="dense teacher checkpoint (random weights when absent)")] = None,
    topk: Annotated[float, typer.Option(help="SLA kept fraction of key blocks (fresh student only)")] = 0.05,
    scope: Annotated[str, typer.Option(help="attention made SLA, global or all (fresh student only)")] = "global",
    fp8: Annotated[bool, typer.Option(help="FP8 E4M3 linear weights with per-row scales (fresh student only)")] = True,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --out file")] = False,
) -> None:
    """Write the deployable artifact of a student: FP8 weights + scales, the rest in bf16, SLA settings and the
    backbone config in one safetensors file; recon.deploy.load_artifact rebuilds it without teacher or QAT model."""
    import lite3r
    from lite3r_recon import models

    sla = lite3r.SLAConfig(topk=topk, scopes=("global",) if scope == "global" else None)
    config = models.export(out, model=model, weights=weights, student=student, config=sla, fp8=fp8,
                           overwrite=overwrite)
    typer.echo(f"wrote {out}: {config['backbone']}, {len(config['sla'])} SLA modules, "
               f"{config['fp8_linears']} FP8 linears")

# --- train (recon/train.py): defaults come from lite3r_recon.train_config.TrainConfig, the one source of them ---
from lite3r_recon.train_config import TrainConfig as _TrainConfig  # noqa: E402  (torch-free)

_TD = {f.name: f.default for f in __import__("dataclasses").fields(_TrainConfig)}


class TrainModel(str, Enum):
    vggt = "vggt"
    da3 = "da3"


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[TrainModel, typer.Argument(help="backbone family to distil")] = TrainModel(_TD["model"]),
    teacher: Annotated[Optional[Path], typer.Option(help="dense teacher checkpoint (.safetensors/.pt); absent: "
                                                         "random weights drawn from --seed")] = None,
    size: Annotated[Optional[str], typer.Option(help="tiny (vggt-tiny/da3-tiny) or full (vggt-1b/da3-large) "
                                                     "(default: full with --teacher, else tiny)")] = None,
    arch: Annotated[Optional[str], typer.Option(help="exact backbone name instead of MODEL + --size "
                                                     "(vggt-tiny, vggt-1b, da3-tiny, da3-large)")] = None,
    data: Annotated[Optional[Path], typer.Option(help="dataset root; absent with synthetic: scenes rendered "
                                                      "on the fly")] = None,
    dataset: Annotated[str, typer.Option(help="synthetic or blendedmvs")] = _TD["dataset"],
    out: Annotated[Path, typer.Option(help="run directory: checkpoints, student.safetensors, metrics.json, "
                                           "loss.png")] = Path("runs/train"),
    scenes: Annotated[Optional[int], typer.Option(help="distinct training scenes, cycled; 0: a new scene for every "
                                                       "sample (default: 16 synthetic on the fly, 0 with --data)")] = None,
    steps: Annotated[int, typer.Option(help="optimizer steps in all")] = _TD["steps"],
    batch: Annotated[int, typer.Option(help="scenes per step over all processes")] = _TD["batch"],
    views: Annotated[int, typer.Option(help="views per scene")] = _TD["views"],
    res: Annotated[Optional[str], typer.Option(help="image size H,W or one size, multiples of 14 "
                                                    "(default: 126,168 tiny, 518 full)")] = None,
    optimizer: Annotated[str, typer.Option(help="adamw, or sgd (momentum 0.9)")] = _TD["optimizer"],
    lr: Annotated[float, typer.Option(help="peak learning rate of proj_l")] = _TD["lr"],
    warmup: Annotated[int, typer.Option(help="linear warm-up steps (then cosine to 10 %)")] = _TD["warmup"],
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = _TD["weight_decay"],
    grad_clip: Annotated[float, typer.Option(help="gradient norm clip (0: off)")] = _TD["grad_clip"],
    lambda_kd: Annotated[float, typer.Option(help="weight of the attention distillation loss")] = _TD["lambda_kd"],
    kd_norm: Annotated[bool, typer.Option(help="distil relative MSE (each layer's MSE over the teacher output's "
                                               "mean square)")] = _TD["kd_norm"],
    target: Annotated[Optional[str], typer.Option(help="task-loss target: gt (the scenes' geometry) or teacher (its "
                                                       "predictions) (default: gt with --teacher, else teacher)")] = None,
    distill: Annotated[str, typer.Option(help="attention outputs distilled: global (cross-view layers), all, or "
                                              "module indices like 0,5,11")] = _TD["distill"],
    sla: Annotated[str, typer.Option(help="attention made SLA: global (cross-view) or all")] = _TD["sla"],
    topk: Annotated[float, typer.Option(help="SLA kept fraction of key blocks, in (0, 1]")] = _TD["topk"],
    block: Annotated[int, typer.Option(help="SLA block size in tokens")] = _TD["block"],
    feature_map: Annotated[str, typer.Option(help="SLA linear-branch feature map: softmax, elu, relu")] =
        _TD["feature_map"],
    fp8: Annotated[bool, typer.Option(help="FP8 fake quant on the linears (QAT)")] = _TD["fp8"],
    grad_ckpt: Annotated[bool, typer.Option(help="activation checkpointing per student block")] = _TD["grad_ckpt"],
    w_camera: Annotated[float, typer.Option(help="task loss weight: camera")] = _TD["w_camera"],
    w_depth: Annotated[float, typer.Option(help="task loss weight: depth")] = _TD["w_depth"],
    w_point: Annotated[float, typer.Option(help="task loss weight: points")] = _TD["w_point"],
    seed: Annotated[int, typer.Option(help="seed of the teacher's random weights and of the data order")] =
        _TD["seed"],
    ckpt_every: Annotated[int, typer.Option(help="checkpoint every N steps (and at the end)")] = _TD["ckpt_every"],
    eval_scenes: Annotated[int, typer.Option(help="held-out scenes for teacher vs student metrics")] =
        _TD["eval_scenes"],
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its latest checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace the run in --out")] = False,
    device: Annotated[Optional[str], typer.Option(help="cuda / cpu (default: cuda when available)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar or table")] = False,
    stop_after: Annotated[Optional[int], typer.Option(hidden=True, help="stop after this step as if killed")] = None,
) -> None:
    """FP8-aware QAT of an SLA student with partial attention distillation from its frozen dense teacher. With no
    --teacher and no --data: the embedded default (tiny architecture, random teacher, synthetic scenes on the fly;
    a few minutes on CPU). Under `torchrun --nproc_per_node=N` it trains with DDP."""
    from lite3r_recon.train_config import parse_res

    fields = {"teacher": str(teacher) if teacher else None, "size": size, "data": str(data) if data else None,
              "dataset": dataset, "scenes": scenes, "steps": steps, "batch": batch, "views": views,
              "res": parse_res(res) if res else None, "optimizer": optimizer, "lr": lr, "warmup": warmup,
              "weight_decay": weight_decay, "grad_clip": grad_clip, "lambda_kd": lambda_kd, "kd_norm": kd_norm,
              "target": target, "distill": distill,
              "sla": sla, "topk": topk, "block": block, "feature_map": feature_map, "fp8": fp8, "grad_ckpt": grad_ckpt,
              "w_camera": w_camera, "w_depth": w_depth, "w_point": w_point, "seed": seed, "ckpt_every": ckpt_every,
              "eval_scenes": eval_scenes, "model": arch or model.value}
    given = lambda name: getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"  # noqa: E731
    explicit = {k for k in fields if k != "model" and given(k)} | ({"model"} if given("arch") or given("model") else set())
    cfg = _TrainConfig(**fields)  # validates before torch is imported
    from lite3r_cli import train as _train

    _train.train(cfg, out, resume=resume, overwrite=overwrite, device=device, quiet=quiet,
                 explicit=explicit, stop_after=stop_after)


# --- reconstruct (recon/reconstruct.py) ---
@app.command()
def reconstruct(
    images: Annotated[list[Path], typer.Argument(help="image files and/or folders of images (sorted by name)")],
    model: Annotated[str, typer.Option(help="backbone: vggt-1b, vggt-tiny, da3-large or da3-tiny")] = "vggt-1b",
    weights: Annotated[Optional[Path], typer.Option(help="dense checkpoint (.safetensors/.pt); random weights when "
                                                         "absent (a smoke test)")] = None,
    student: Annotated[Optional[Path], typer.Option(help="lite3r student: DIR of lite3r train or its "
                                                         "student.safetensors (absent: the dense model)")] = None,
    size: Annotated[int, typer.Option(help="image size in pixels (width in crop mode, longer side in pad mode), "
                                           "a multiple of 14")] = 518,
    mode: Annotated[str, typer.Option(help="crop (width to --size, centre-crop the height) or pad (longer side to "
                                           "--size, pad to a square)")] = "crop",
    conf_percentile: Annotated[float, typer.Option(help="drop the points whose confidence is below this percentile "
                                                        "over all views, in [0, 100)")] = 50.0,
    out: Annotated[Path, typer.Option(help="point cloud to write, .ply or .glb")] = Path("scene.ply"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write cameras (w2c OpenCV extrinsics, "
                                                                    "intrinsics) and per-view stats here")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace existing --out / --json files")] = False,
    device: Annotated[Optional[str], typer.Option(help="cuda / cpu (default: cuda when available)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar or tables")] = False,
) -> None:
    """Reconstruct a scene: predicted depth unprojected with the predicted cameras into a coloured world-space point
    cloud (low-confidence points dropped), plus the cameras as JSON."""
    from lite3r_cli import reconstruct as _reconstruct

    _reconstruct.reconstruct(images, model=model, weights=weights, student=student, size=size, mode=mode,
                             conf_percentile=conf_percentile, out=out, json_path=json_out, overwrite=overwrite,
                             device=device, quiet=quiet)



class EvalDataset(str, Enum):
    blendedmvs = "blendedmvs"
    dtu64 = "dtu64"
    synthetic = "synthetic"


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="backbone name: vggt-tiny, vggt-1b, da3-tiny, da3-large")],
    data: Annotated[Optional[Path], typer.Option(help="dataset root (default with --dataset synthetic: scenes "
                                                      "generated in memory)")] = None,
    dataset: Annotated[EvalDataset, typer.Option(help="benchmark format")] = EvalDataset.synthetic,
    views: Annotated[int, typer.Option(help="views per scene (evenly spaced)")] = 4,
    weights: Annotated[Optional[Path], typer.Option(help="dense checkpoint (default: random weights)")] = None,
    student: Annotated[Optional[Path], typer.Option(help="lite3r student (student.safetensors or its run folder) "
                                                         "built on MODEL")] = None,
    size: Annotated[Optional[int], typer.Option(help="image width, multiple of 14 (default: 518; embedded "
                                                     "synthetic: 126x168)")] = None,
    max_scenes: Annotated[Optional[int], typer.Option(help="evaluate at most N scenes (embedded synthetic: N "
                                                           "scenes, default 2)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the results as JSON")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu / cuda (default: cuda when available)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing --json file")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar or tables")] = False,
) -> None:
    """Evaluate a backbone (or a lite3r student) on BlendedMVS, DTU64 or synthetic scenes: depth AbsRel /
    delta<1.25 / RMSE, pose RRA/RTA and AUC@30/15/5/3, point-cloud accuracy / completeness / Chamfer / F-score."""
    from lite3r_cli import evaluate as _evaluate

    _evaluate.evaluate(model, dataset=dataset.value, data=data, views=views, weights=weights, student=student,
                       size=size, max_scenes=max_scenes, device=device, json_path=json_out, overwrite=overwrite,
                       quiet=quiet)


@app.command("make-scenes")
def make_scenes(
    out: Annotated[Path, typer.Argument(help="folder for the scenes (scene_0000, ...), BlendedMVS layout")],
    num: Annotated[int, typer.Option(help="number of scenes")] = 100,
    views: Annotated[int, typer.Option(help="views per scene")] = 16,
    size: Annotated[int, typer.Option(help="image height and width in pixels")] = 518,
    seed: Annotated[int, typer.Option(help="seed of the first scene (scene k uses seed + k)")] = 0,
    overwrite: Annotated[bool, typer.Option(help="re-render scenes already in OUT")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
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
    size: Annotated[str, typer.Option(help="tiny (vggt-tiny / da3-tiny) or small (vggt-small / da3-small)")] = "tiny",
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (default 2000)")] = None,
    batch: Annotated[Optional[int], typer.Option(help="new synthetic scenes per step (default 16)")] = None,
    views: Annotated[Optional[int], typer.Option(help="views per scene (default 4)")] = None,
    res: Annotated[Optional[str], typer.Option(help="H,W or one size, multiples of 14 (default 126,168 tiny, "
                                                    "252 small)")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak AdamW learning rate (default 1e-3)")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="linear warm-up steps, then cosine to 10 % (default 100)")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay (default 0.05)")] = None,
    w_camera: Annotated[Optional[float], typer.Option(help="camera loss weight (default 5)")] = None,
    w_depth: Annotated[Optional[float], typer.Option(help="depth loss weight (default 1)")] = None,
    w_point: Annotated[Optional[float], typer.Option(help="point loss weight (default 1)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="init and data seed (default 0)")] = None,
    ckpt_every: Annotated[Optional[int], typer.Option(help="checkpoint every N steps (default 250)")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="held-out curve point every N steps (default 250)")] = None,
    eval_scenes: Annotated[Optional[int], typer.Option(help="held-out scenes of the final metrics (default 16)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="run folder (default runs/pretrain-FAMILY-SIZE)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="start over, replacing the run in --out")] = False,
    device: Annotated[Optional[str], typer.Option(help="cuda / cpu (default: cuda when available)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar or table")] = False,
) -> None:
    """Train a dense teacher from scratch with the backbone's own task loss on synthetic scenes (a new scene per
    sample, rendered on the device; held-out scenes by seed range): teacher.safetensors (fp16), metrics, plots."""
    from lite3r_cli import pretrain as _pretrain

    _pretrain.main(family.value, size=size, out=str(out) if out else None, resume=resume, overwrite=overwrite,
                   device=device, quiet=quiet, steps=steps, batch=batch, views=views, res=res, lr=lr,
                   warmup=warmup, weight_decay=weight_decay, w_camera=w_camera, w_depth=w_depth, w_point=w_point,
                   seed=seed, ckpt_every=ckpt_every, eval_every=eval_every, eval_scenes=eval_scenes)


def main() -> None:
    """Console entry point: run the app, turning known errors into one clear line."""
    try:
        app()
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError, TypeError) as err:
        if os.environ.get("LITE3R_DEBUG"):
            raise
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
        sys.exit(2)

