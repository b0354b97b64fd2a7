"""`lite3r bench`: what a user feels - latency and peak memory of one whole reconstruction - for four paths of the
same backbone, measured in one process on the same images:

    (a) dense, as the official code runs it: fp32 weights + bf16 autocast, SDPA, all aggregator layers kept
    (b) dense, our best: bf16 weights, lean activations (only the layers the heads read), compiled
    (c) SLA on the global (cross-view) attention, otherwise as (b)
    (d) SLA + FP8: the deployed student (FP8 W8A8 linears on sm90+, fused SLA kernel), lean, compiled

Each path: warm-up (compile included, reported apart), median latency over repeats, peak memory
(`torch.cuda.max_memory_allocated`, reset once the weights are on the device), ratios against (a) and (b), and
the output difference against (a) (relative error of depth and of the camera extrinsics). On a machine without
CUDA the tiny configuration runs eagerly and the table says so.

"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lite3r_recon.train_config import check_sparsity, resolve_backbone
from lite3r_recon.errors import InvalidInput

if TYPE_CHECKING:  # annotations only: torch is imported inside the functions
    import torch
    from torch import nn

GiB = 2**30
VARIANTS: dict[str, tuple[str, str]] = {  # key -> (short name for the table, description)
    "a": ("official", "dense as the official code runs it: fp32 weights + bf16 autocast, SDPA, all layers kept"),
    "b": ("dense best", "dense, bf16 weights, lean activations, compiled"),
    "c": ("SLA", "SLA on global attention, otherwise as (b)"),
    "d": ("SLA+FP8", "SLA + FP8 deployed student (W8A8 on sm90+, fused SLA kernel), lean, compiled"),
    # extra paths for the backbone issue (lean vs all layers, both bf16 and eager): select with --variants
    "bf16-all": ("bf16 all", "dense bf16 weights, eager, all aggregator layers kept"),
    "bf16-lean": ("bf16 lean", "dense bf16 weights, eager, only the layers the heads read kept"),
}
DENSE = ("a", "b", "bf16-all", "bf16-lean")  # paths with dense attention: estimated past BenchConfig.dense_max_views


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. `model` is a family ("vggt", "da3": full size on CUDA, tiny on CPU) or a backbone name."""

    model: str = "vggt"
    views: tuple[int, ...] = (32,)
    res: int | None = None  # None: 518 on CUDA, 140 on CPU (the tiny config's smoke test)
    topk: float = 0.05
    kept_blocks: int | None = None  # SLA kept key blocks per query block, a count instead of topk (fresh students)
    repeats: int | None = None  # None: 3 on CUDA, 1 on CPU
    warmup: int | None = None  # None: 2 on CUDA (compile, then autotune / CUDA-graph capture), 1 on CPU
    variants: tuple[str, ...] = ("a", "b", "c", "d")
    compile_mode: str | None = "default"  # None: eager; else a torch.compile mode
    compile_sla: bool = True  # SLA kernels traced into the compiled blocks (False: eager inside them)
    weights: str | None = None  # dense checkpoint for the teacher (random weights when absent)
    student: str | None = None  # student.safetensors (trained proj_l) for (c) and (d)
    device: str | None = None  # None: cuda when available, else cpu
    head_dtype: str = "bfloat16"  # DPT/camera heads of (b)-(d): "bfloat16" (autocast) or "float32" (as official)
    seed: int = 0
    # dense paths (a, b, bf16-*) above this many views are not run: their latency is estimated from the measured
    # per-layer cost (lite3r_recon.layer_cost) and marked so; None: always run them
    dense_max_views: int | None = 256
    kept_fp8: bool = False  # (d): the aggregator layers the heads read kept in FP8 (half the memory, unmeasured error)
    head_frames: int | None = None  # (b)-(d): DPT heads over this many frames at a time (None: the model's 8)
    chunk_tokens: int | None = None  # (b)-(d): per-token work (MLPs, attention projections) over this many tokens at
    # a time (None: deploy's 65,536); fewer: a lower peak, more launches

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise InvalidInput(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
        if not self.views or min(self.views) < 1:
            raise InvalidInput(f"--views must be positive integers, got {self.views}")
        if self.head_frames is not None and self.head_frames < 1:
            raise InvalidInput(f"--head-frames must be at least 1, got {self.head_frames}")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise InvalidInput(f"--chunk-tokens must be at least 1, got {self.chunk_tokens}")
        if self.res is not None and (self.res % 14 or self.res < 14):
            raise InvalidInput(f"--res must be a multiple of the patch size 14, got {self.res}")
        check_sparsity(self.topk, self.kept_blocks)
        if self.dense_max_views is not None and self.dense_max_views < 0:
            raise InvalidInput(f"--dense-max-views must be >= 0, got {self.dense_max_views}")
        if (self.repeats is not None and self.repeats < 1) or (self.warmup is not None and self.warmup < 1):
            raise InvalidInput("--repeats and --warmup must be at least 1")


def parse_views(text: str) -> tuple[int, ...]:
    """'8,32,128' -> (8, 32, 128)."""
    try:
        views = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise InvalidInput(f"--views takes integers separated by commas (e.g. 8,32,128), got {text!r}") from None
    if not views or min(views) < 1:
        raise InvalidInput(f"--views takes positive integers, got {text!r}")
    return views


def resolve_backbone_for(model: str, device: torch.device) -> str:
    """A family means the full model on CUDA and the tiny config elsewhere; a backbone name passes through."""
    return resolve_backbone(model, full=device.type == "cuda")


# -------------------------------------------------------------------------------------------- building the paths
def compile_mode_of(variant: str, compile_mode: str | None, device: str) -> str | None:
    """How path `variant` runs: (b)-(d) compiled with --compile-mode on CUDA, everything else eager."""
    return compile_mode if variant in ("b", "c", "d") and device == "cuda" else None


def variant_label(variant: str, compile_mode: str | None) -> str:
    """The path's description, saying how it ran (compile_mode_of's answer)."""
    how = f"compiled ({compile_mode})" if compile_mode else "eager (--compile-mode none)"
    return VARIANTS[variant][1].replace("compiled", how)


def build_variant(variant: str, name: str, cfg: BenchConfig, device: torch.device) -> nn.Module:
    """The dense model (models.dense_model: the same weights every time) turned into path `variant`, on `device`."""
    from lite3r import SLAConfig
    from lite3r_recon import models

    compile_mode = compile_mode_of(variant, cfg.compile_mode, device.type)
    if variant == "d" and models.is_artifact(cfg.student):  # a `lite3r export` file: deployed as it was exported
        model = models.load_artifact(cfg.student, device=device, compile_mode=compile_mode)
        if model.name != name:
            raise InvalidInput(f"--student {cfg.student} is a {model.name} artifact, not {name}")
        return model
    # the same weights every time (file or seed 0); with --student, every path on the teacher it was trained from
    model = (models.teacher_of(cfg.student, weights=cfg.weights, device=device) if cfg.student
             else models.dense_model(name, cfg.weights, device=device))
    if model.name != name:
        raise InvalidInput(f"--student {cfg.student} was trained on {model.name}, not on {name}")
    if variant == "a":  # the official precision: fp32 weights, heads in fp32 outside autocast, every layer kept
        return models.configure(model, lean=False, head_dtype="float32")
    models.configure(model, lean=variant != "bf16-all", head_dtype=cfg.head_dtype)
    if variant == "d" and cfg.student:  # the trained student, with the SLA / FP8 settings it was trained with
        model = models.load_student(cfg.student, model)
    elif variant in ("c", "d"):
        model = models.make_student(model, SLAConfig(topk=cfg.topk, kept_blocks=cfg.kept_blocks), fp8=variant == "d",
                                    inplace=True)
    return models.deploy_model(model, device=device, dtype=models.compute_dtype(device), compile_mode=compile_mode,
                               compile_sla=cfg.compile_sla, kept_fp8=cfg.kept_fp8 and variant == "d",
                               head_frames=cfg.head_frames,
                               **({} if cfg.chunk_tokens is None else {"mlp_chunk_tokens": cfg.chunk_tokens}))


def watch_sparsity(model: nn.Module) -> Callable[[], dict]:
    """Before the first forward: a pre-hook on the model's first SLA module records its token count N; the returned
    function gives what that module then selected, computed as the kernels do: {"key_blocks": Mk, "kept_blocks": K
    per query block, "kept_frac": K / Mk} (all None for a model without SLA, or before a forward)."""
    import lite3r

    first = next((m for m in model.modules() if isinstance(m, lite3r.SLAAttention)), None)
    seen: dict = {}
    if first is not None:  # a plain int store: traced into the compiled block, no graph break
        first.register_forward_pre_hook(lambda m, args, kwargs: seen.__setitem__(
            "tokens", (args or tuple(kwargs.values()))[0].shape[-2]), with_kwargs=True)

    def used() -> dict:
        if "tokens" not in seen:
            return {"key_blocks": None, "kept_blocks": None, "kept_frac": None}
        n_k = -(-seen["tokens"] // first.block_k)
        kept = lite3r.num_kept_blocks(seen["tokens"], topk=first.topk, kept_blocks=first.kept_blocks,
                                      block_k=first.block_k)
        return {"key_blocks": n_k, "kept_blocks": kept, "kept_frac": kept / n_k}

    return used


def _cameras(name: str, out: dict, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    from lite3r_backbones import to_cameras

    cams = to_cameras(name, out, hw)
    return {k: cams[k].detach().float().cpu() for k in ("depth", "extrinsics")}


# ---------------------------------------------------------------------------------------------------- benchmark
def estimated_row(variant: str, views: int, model: nn.Module, cfg: BenchConfig, device: torch.device,
                  build_s: float, log: Callable[[str], None] = print) -> dict:
    """A row for a dense path not run at `views`: its latency from the measured per-layer cost (eager blocks at
    their shapes at `views`, lite3r_recon.layer_cost); no memory, no output error."""
    from lite3r_recon import models
    from lite3r_recon.layer_cost import estimate_latency

    log(f"[{model.name} x{views}] ({variant}) over --dense-max-views {cfg.dense_max_views}: estimating the latency "
        f"from the per-layer cost")
    dtype = models.compute_dtype(device)  # the autocast infer runs the blocks under (none in fp32)
    est = estimate_latency(model, lambda images: models.infer(model, images), views, res=cfg.res, device=device,
                           autocast=None if str(dtype) == "torch.float32" else dtype, repeats=cfg.repeats, log=log)
    log(f"[{model.name} x{views}] ({variant}) estimated {est['latency_s']:.2f} s (blocks {est['blocks_s']:.2f} s, "
        f"rest {est['rest_s']:.2f} s)")
    return {"variant": variant, "label": variant_label(variant, None), "views": views, "latency_s": est["latency_s"],
            "latencies_s": [], "warmup_s": None, "build_s": build_s, "peak_gib": None, "weights_gib": None,
            "key_blocks": None, "kept_blocks": None, "kept_frac": None, "estimated": True, "estimate": est,
            "err_ref": None, **{f"{k}_{kind}": None for k in ("depth", "extrinsics") for kind in ("rel", "rel_spread")}}


def bench_views(cfg: BenchConfig, views: int, name: str, device: torch.device,
                log: Callable[[str], None] = print, profile: bool = False) -> tuple[list[dict], dict]:
    """All selected paths at one view count: one row (dict) per path, and with `profile` the profile of each path
    that ran (path -> profile_breakdown)."""
    import torch

    from lite3r_recon import models
    from lite3r_recon.timing import cpu_estimate, free, long_step, rel_err, sync, time_calls

    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.rand(1, views, 3, cfg.res, cfg.res, generator=gen).to(device)
    rows, ref, prof = [], None, {}
    for variant in cfg.variants:
        label = variant_label(variant, compile_mode_of(variant, cfg.compile_mode, device.type))
        log(f"[{name} x{views}] ({variant}) {label}: building")
        free(device)
        torch._dynamo.reset()  # each path compiles from scratch, as in its own process
        estimated = variant in DENSE and cfg.dense_max_views is not None and views > cfg.dense_max_views
        t_build = time.perf_counter()  # (estimated: eager, each block timed at its own shapes)
        model = build_variant(variant, name, dataclasses.replace(cfg, compile_mode=None) if estimated else cfg, device)
        t_build = time.perf_counter() - t_build
        if estimated:
            rows.append(estimated_row(variant, views, model, cfg, device, t_build, log))
            del model
            continue
        sparsity = watch_sparsity(model)
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        weights_gib = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
        calls = cfg.warmup + cfg.repeats
        with long_step(f"[{name} x{views}] ({variant}) {calls} forwards",
                       cpu_estimate(model, views, (cfg.res, cfg.res), calls)):
            warm, times, out = time_calls(lambda: models.infer(model, images), device=device,
                                          warmup=cfg.warmup, repeats=cfg.repeats)
        peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
        cams = _cameras(name, out, (cfg.res, cfg.res))
        del out
        if profile:
            log(f"[{name} x{views}] ({variant}) profiling one forward")
            from lite3r_cli.bench_profile import profile_breakdown

            prof[variant] = profile_breakdown(model, images)
        kept_fp8 = bool(getattr(getattr(model, "config", None), "kept_fp8", False))  # what the model ran with
        del model
        row = {"variant": variant, "label": label, "views": views, "latency_s": statistics.median(times),
               "latencies_s": times, "warmup_s": warm, "build_s": t_build, "peak_gib": peak, "weights_gib": weights_gib,
               "kept_fp8": kept_fp8, **sparsity()}
        if ref is None:
            ref = (variant, cams)
        row["err_ref"] = ref[0]
        for key in ("depth", "extrinsics"):
            for kind, val in rel_err(cams[key], ref[1][key]).items():
                row[f"{key}_{kind}"] = val
        rows.append(row)
        log(f"[{name} x{views}] ({variant}) {row['latency_s']:.4f} s, warm-up {warm:.1f} s, "
            f"peak {'-' if peak is None else f'{peak:.2f} GiB'}")
    _add_ratios(rows)
    return rows, prof


def _add_ratios(rows: list[dict]) -> None:
    by = {r["variant"]: r for r in rows}
    for r in rows:
        for base in ("a", "b"):
            if base in by:
                r[f"speedup_vs_{base}"] = by[base]["latency_s"] / r["latency_s"]
                pa, pr = by[base]["peak_gib"], r["peak_gib"]
                r[f"mem_ratio_vs_{base}"] = pa / pr if pa and pr else None


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print, profile: bool = False) -> dict:
    """The whole benchmark: every view count of cfg.views, every path of cfg.variants. Returns a JSON-able dict;
    with `profile`, also where each path's forward spends its time at each view count (profile[views][path])."""
    from lite3r_recon import models
    from lite3r_recon.models import resolve_device
    from lite3r_recon.timing import environment

    device = resolve_device(cfg.device)
    name = resolve_backbone_for(cfg.model, device)
    note = None
    gpu = device.type == "cuda"
    cfg = dataclasses.replace(cfg, res=cfg.res or (518 if gpu else 140), repeats=cfg.repeats or (3 if gpu else 1),
                              warmup=cfg.warmup or (2 if gpu else 1))
    random = models.weights_note(name, cfg.weights)
    if random:
        log(random)
    if device.type != "cuda":
        note = (f"no CUDA: ran the tiny config {name!r} eagerly on {device} in fp32 at {cfg.res}x{cfg.res}, a smoke "
                f"test of the paths, not a measurement; peak memory is not measured")
        log(note)
    rows, profiles = [], {}
    for views in cfg.views:
        new, prof = bench_views(cfg, views, name, device, log, profile)
        rows += new
        if prof:
            profiles[views] = prof
    out = {"config": dataclasses.asdict(cfg), "backbone": name, "note": note, "env": environment(device),
           "results": rows}
    if profiles:
        out["profile"] = profiles
    return out


# ------------------------------------------------------------------------------------------------------- output
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def results_table(result: dict):
    """A rich Table of the rows of `run_bench`."""
    from rich.table import Table

    cfg = result["config"]
    kept = f"kept_blocks={cfg['kept_blocks']}" if cfg.get("kept_blocks") else f"topk={cfg['topk']}"
    title = (f"lite3r bench {result['backbone']}, {cfg['res']}x{cfg['res']}, {kept}"
             + (", (d) kept layers FP8" if cfg.get("kept_fp8") else "")
             + (f", heads {cfg['head_frames']} frames at a time" if cfg.get("head_frames") else "")
             + (f", token chunks of {cfg['chunk_tokens']}" if cfg.get("chunk_tokens") else ""))
    env = result["env"]
    legend = "; ".join(f"({v}) " + variant_label(v, compile_mode_of(v, cfg.get("compile_mode"), env["device"]))
                       for v in cfg["variants"])
    ref = next((r["err_ref"] for r in result["results"] if r.get("err_ref")), "-")
    caption = (f"{env.get('gpu', env['device'])}, torch {env['torch']}. {legend}. x: speed-up, mem: peak-memory "
               f"ratio; err: |out - ref| / |ref| vs ({ref}) of depth and extrinsics; "
               f"K / Mk: key blocks kept per query block of all, and that fraction, in the first SLA module.")
    if any(r.get("estimated") for r in result["results"]):
        caption += (f" est.: not run (dense past --dense-max-views {cfg.get('dense_max_views')}), latency estimated "
                    f"from the measured per-layer cost (eager blocks at their shapes; heads scaled from 4 views).")
    if result.get("note"):
        caption += f"\n{result['note']}"
    table = Table(title=title, caption=caption)
    for col in ("S", "path", "K / Mk", "kept", "latency s", "warm s", "peak GiB", "x a", "x b", "mem a", "mem b",
                "depth err", "pose err"):
        table.add_column(col, justify="left" if col == "path" else "right", no_wrap=True)
    for r in result["results"]:
        blocks = "-" if r.get("kept_blocks") is None else f"{r['kept_blocks']} / {r['key_blocks']}"
        table.add_row(str(r["views"]), f"({r['variant']}) {VARIANTS[r['variant']][0]}", blocks,
                      _fmt(r.get("kept_frac"), ".2%"),
                      _fmt(r["latency_s"], ".4f") + (" est." if r.get("estimated") else ""),
                      _fmt(r["warmup_s"], ".1f"), _fmt(r["peak_gib"], ".2f"), _fmt(r.get("speedup_vs_a"), ".2f"),
                      _fmt(r.get("speedup_vs_b"), ".2f"), _fmt(r.get("mem_ratio_vs_a"), ".2f"),
                      _fmt(r.get("mem_ratio_vs_b"), ".2f"), _fmt(r["depth_rel"], ".2e"),
                      _fmt(r["extrinsics_rel"], ".2e"))
    return table


def plot_sweep(result: dict, path: str, *, overwrite: bool = False) -> None:
    """Latency and peak memory against the number of views, one line per path (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lite3r_recon.io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in result["config"]["variants"]:
        rows = [r for r in result["results"] if r["variant"] == variant]
        xs = [r["views"] for r in rows]
        axes[0].plot(xs, [r["latency_s"] for r in rows], "o-", label=f"({variant}) {VARIANTS[variant][0]}")
        if all(r["peak_gib"] is not None for r in rows):
            axes[1].plot(xs, [r["peak_gib"] for r in rows], "o-", label=f"({variant})")
    for ax, ylabel in zip(axes, ("latency (s)", "peak memory (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("views")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"lite3r bench {result['backbone']} ({result['env'].get('gpu', result['env']['device'])})")
    fig.tight_layout()
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- command driver
def main(target: str, cfg: BenchConfig, *, json_path: str | None = None, plot_path: str | None = None,
         profile: bool = False, overwrite: bool = False, console=None) -> dict:
    """What `lite3r bench` does: run, print the tables, write the JSON / plot. Refuses to overwrite files unless
    asked, and checks that before the (long) run."""
    from lite3r_recon.io import atomic_write_json, console as make_console, ensure_writable

    console = console or make_console(min_width=130)  # the table needs ~110 columns
    for path in (json_path, plot_path):
        if path:
            ensure_writable(path, overwrite)
    from rich.markup import escape

    log = lambda msg: console.print(f"[dim]{escape(msg)}[/dim]")  # noqa: E731  ([vggt x8] is text, not markup)
    from lite3r_cli.bench_attention import attention_table, bench_attention
    from lite3r_cli.bench_profile import compare_table, profile_tables

    if target == "kernels":
        from lite3r_kernels import bench as kernel_bench

        result = kernel_bench.run(views=cfg.views, topk=cfg.topk)
    elif target == "attention":
        result = bench_attention(views=cfg.views, res=cfg.res or 518, topk=cfg.topk, repeats=cfg.repeats or 5,
                                 device=cfg.device, log=log)
        console.print(attention_table(result))
    else:
        result = run_bench(cfg, log=log, profile=profile)
        console.print(results_table(result))
        for views, by_path in result.get("profile", {}).items():
            for variant, prof in by_path.items():
                for table in profile_tables(prof, f"profile of ({variant}) at {views} views"):
                    console.print(table)
            if len(by_path) > 1:
                console.print(compare_table(by_path, f"GPU time by kernel category at {views} views, path by path"))
        if plot_path:
            plot_sweep(result, plot_path, overwrite=overwrite)
    if json_path:
        atomic_write_json(json_path, result, overwrite=overwrite)
    return result
