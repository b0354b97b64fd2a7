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
    from recon import bench as _bench

    cfg = _bench.BenchConfig(
        model=backbone or (target.value if target in (BenchTarget.vggt, BenchTarget.da3) else "vggt"),
        views=_bench.parse_views(views), res=res, topk=topk, repeats=repeats, warmup=warmup,
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        compile_mode=None if compile_mode == "none" else compile_mode,
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
    from recon import deploy as _deploy

    config = _deploy.export(out, model=model, weights=weights, student=student, topk=topk, scope=scope, fp8=fp8,
                            overwrite=overwrite)
    typer.echo(f"wrote {out}: {config['backbone']}, {len(config['sla'])} SLA modules, "
               f"{config['fp8_linears']} FP8 linears")

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


if __name__ == "__main__":
    main()
