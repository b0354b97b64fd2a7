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

    python -m lite3r_recon.bench vggt --views 2            # tiny config on CPU in seconds
"""
from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

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
FAMILIES = {"vggt": ("vggt-1b", "vggt-tiny"), "da3": ("da3-large", "da3-tiny")}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. `model` is a family ("vggt", "da3": full size on CUDA, tiny on CPU) or a backbone name."""

    model: str = "vggt"
    views: tuple[int, ...] = (32,)
    res: int | None = None  # None: 518 on CUDA, 140 on CPU (the tiny config's smoke test)
    topk: float = 0.05
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

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
        if not self.views or min(self.views) < 1:
            raise ValueError(f"--views must be positive integers, got {self.views}")
        if self.res is not None and (self.res % 14 or self.res < 14):
            raise ValueError(f"--res must be a multiple of the patch size 14, got {self.res}")
        if not 0 < self.topk <= 1:
            raise ValueError(f"--topk is the kept fraction of key blocks, in (0, 1]; got {self.topk}")
        if (self.repeats is not None and self.repeats < 1) or (self.warmup is not None and self.warmup < 1):
            raise ValueError("--repeats and --warmup must be at least 1")


def parse_views(text: str) -> tuple[int, ...]:
    """'8,32,128' -> (8, 32, 128)."""
    try:
        views = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--views takes integers separated by commas (e.g. 8,32,128), got {text!r}") from None
    if not views or min(views) < 1:
        raise ValueError(f"--views takes positive integers, got {text!r}")
    return views


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def resolve_backbone(model: str, device: torch.device) -> str:
    """Family -> the full model on CUDA, the tiny config elsewhere; a backbone name passes through."""
    if model in FAMILIES:
        return FAMILIES[model][0 if device.type == "cuda" else 1]
    return model


# ------------------------------------------------------------------------------------------------ timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_calls(fn: Callable[[], Any], *, device: torch.device, warmup: int, repeats: int) -> tuple[float, list[float], Any]:
    """Run `fn` warmup + repeats times; return (total warm-up seconds, per-repeat seconds, last output)."""
    out = None
    _sync(device)
    start = time.perf_counter()
    for _ in range(warmup):
        out = None  # free the previous output before the next call: it would count in the peak
        out = fn()
    _sync(device)
    warm = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        out = None
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return warm, times, out


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """|x - ref| / |ref| and the same over the spread of ref (random weights give tiny spreads around a mean)."""
    x, ref = x.double(), ref.double()
    diff = (x - ref).norm()
    return {
        "rel": float(diff / ref.norm().clamp_min(1e-30)),
        "rel_spread": float(diff / (ref - ref.mean()).norm().clamp_min(1e-30)),
    }


# -------------------------------------------------------------------------------------------- building the paths
def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are emulated and slower than fp32 (the CPU run is a smoke
    test of the paths, not a measurement)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def forward(model: nn.Module, images: torch.Tensor):
    """Every path runs under bf16 autocast on CUDA, as the official demos do: with bf16 weights it only keeps
    LayerNorm, softmax and reductions in fp32 (the geometry-fragile ops) and casts the fp32 images."""
    with torch.inference_mode(), torch.autocast(images.device.type, dtype=torch.bfloat16,
                                                enabled=compute_dtype(images.device) == torch.bfloat16):
        return model(images)


def configure(model: nn.Module, **changes) -> nn.Module:
    """Set inference options of a backbone's frozen config (lean, head_dtype, ...) that its config has."""
    fields = {f.name for f in dataclasses.fields(model.config)}
    model.config = dataclasses.replace(model.config, **{k: v for k, v in changes.items() if k in fields})
    return model


def build_variant(variant: str, name: str, cfg: BenchConfig, device: torch.device) -> nn.Module:
    """The dense model (`build_base`: the same weights every time) turned into path `variant`, on `device`."""
    from lite3r_recon import deploy

    model = build_base(name, cfg.weights, device)
    if variant == "a":  # the official precision: fp32 weights, heads in fp32 outside autocast, every layer kept
        return configure(model, lean=False, head_dtype="float32")
    configure(model, lean=variant != "bf16-all", head_dtype=cfg.head_dtype)
    compile_mode = cfg.compile_mode if variant in ("b", "c", "d") and device.type == "cuda" else None
    if variant == "d" and cfg.student:  # the trained student, with the SLA / FP8 settings it was trained with
        from lite3r_recon.train import load_student

        model = load_student(cfg.student, model)
    elif variant in ("c", "d"):
        model = deploy.make_student(model, topk=cfg.topk, fp8=variant == "d", student=cfg.student)
    return deploy.deploy_model(model, device=device, dtype=compute_dtype(device), compile_mode=compile_mode,
                               compile_sla=cfg.compile_sla)


def _cameras(name: str, out: dict, hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    from lite3r_backbones import to_cameras

    cams = to_cameras(name, out, hw)
    return {k: cams[k].detach().float().cpu() for k in ("depth", "extrinsics")}


# ---------------------------------------------------------------------------------------------------- benchmark
def bench_views(cfg: BenchConfig, views: int, name: str, device: torch.device,
                log: Callable[[str], None] = print, profile: bool = False) -> tuple[list[dict], dict | None]:
    """All selected paths at one view count: one row (dict) per path, and the profile of the last path."""
    gen = torch.Generator().manual_seed(cfg.seed)
    images = torch.rand(1, views, 3, cfg.res, cfg.res, generator=gen).to(device)
    rows, ref, prof = [], None, None
    for variant in cfg.variants:
        log(f"[{name} x{views}] ({variant}) {VARIANTS[variant][1]}: building")
        _free(device)
        torch._dynamo.reset()  # each path compiles from scratch, as in its own process
        t_build = time.perf_counter()
        model = build_variant(variant, name, cfg, device)
        t_build = time.perf_counter() - t_build
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        weights_gib = torch.cuda.memory_allocated(device) / GiB if device.type == "cuda" else None
        warm, times, out = time_calls(lambda: forward(model, images), device=device,
                                      warmup=cfg.warmup, repeats=cfg.repeats)
        peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
        cams = _cameras(name, out, (cfg.res, cfg.res))
        del out
        if profile and variant == cfg.variants[-1]:
            log(f"[{name} x{views}] ({variant}) profiling one forward")
            prof = profile_breakdown(model, images)
        del model
        row = {"variant": variant, "label": VARIANTS[variant][1], "views": views, "latency_s": statistics.median(times),
               "latencies_s": times, "warmup_s": warm, "build_s": t_build, "peak_gib": peak, "weights_gib": weights_gib}
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


def environment(device: torch.device) -> dict:
    env = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    try:
        import lite3r_kernels as kernels

        env["kernels_available"] = bool(getattr(kernels, "AVAILABLE", False))
    except ImportError:
        env["kernels_available"] = False
    return env


def build_base(name: str, weights: str | None, device: torch.device) -> nn.Module:
    """The dense model in fp32 on `device`: the checkpoint's weights, or random ones from a fixed seed (the same on
    every call, so each path starts from identical weights without holding a copy)."""
    from lite3r_backbones import build_backbone, load_checkpoint

    if weights:  # built on the meta device, the file's tensors go straight to `device`
        model = build_backbone(name, device="meta")
        load_checkpoint(model, weights, strict=True, skip_prefixes=("track_head.",), device=device)
    else:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)
            model = build_backbone(name, device=device)
    return model.eval().requires_grad_(False)


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print, profile: bool = False) -> dict:
    """The whole benchmark: every view count of cfg.views, every path of cfg.variants. Returns a JSON-able dict;
    with `profile`, also where the last path's forward spends its time at each view count."""
    device = resolve_device(cfg.device)
    name = resolve_backbone(cfg.model, device)
    note = None
    gpu = device.type == "cuda"
    cfg = dataclasses.replace(cfg, res=cfg.res or (518 if gpu else 140), repeats=cfg.repeats or (3 if gpu else 1),
                              warmup=cfg.warmup or (2 if gpu else 1))
    if device.type != "cuda":
        note = (f"no CUDA: ran the tiny config {name!r} eagerly on {device} in fp32 at {cfg.res}x{cfg.res}, a smoke "
                f"test of the paths, not a measurement; peak memory is not measured")
        log(note)
    rows, profiles = [], {}
    for views in cfg.views:
        new, prof = bench_views(cfg, views, name, device, log, profile)
        rows += new
        if prof is not None:
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
    title = f"lite3r bench {result['backbone']}, {cfg['res']}x{cfg['res']}, topk={cfg['topk']}"
    env = result["env"]
    legend = "; ".join(f"({v}) {VARIANTS[v][1]}" for v in cfg["variants"])
    caption = (f"{env.get('gpu', env['device'])}, torch {env['torch']}. {legend}. x: speed-up, mem: peak-memory "
               f"ratio; err: |out - ref| / |ref| vs ({result['results'][0]['err_ref']}) of depth and extrinsics.")
    if result.get("note"):
        caption += f"\n{result['note']}"
    table = Table(title=title, caption=caption)
    for col in ("S", "path", "latency s", "warm s", "peak GiB", "x a", "x b", "mem a", "mem b", "depth err",
                "pose err"):
        table.add_column(col, justify="left" if col == "path" else "right", no_wrap=True)
    for r in result["results"]:
        table.add_row(str(r["views"]), f"({r['variant']}) {VARIANTS[r['variant']][0]}", _fmt(r["latency_s"], ".4f"),
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


# ------------------------------------------------------------------------------------------------------ profile
KERNEL_CATEGORIES: list[tuple[str, str]] = [  # first match wins; names as the CUDA kernels are called
    ("SLA (block map + fused sparse/linear kernel)", r"sla|block_map|blockmap|lut|sparse"),
    ("dense attention (SDPA / flash)", r"flash|fmha|attention|attn|sdpa"),
    ("convolution (DPT heads, patch embed)", r"conv|cudnn|implicit|winograd|fprop|xmma_fprop|dgrad"),
    ("FP8 GEMM (_scaled_mm)", r"e4m3|f8f8|fp8.*gemm|gemm.*fp8|qqbf|qq_|scaled_mm"),
    ("GEMM (bf16/fp32)", r"gemm|matmul|_mm_|cutlass|xmma|nvjet|cublas|splitk|sm90_"),
    ("FP8 quantise (amax/scale/cast)", r"quant|amax|fp8|float8"),
    ("fused elementwise / norms (Triton, Inductor)", r"^triton_|triton"),
    ("elementwise / copies / reductions (ATen)", r"elementwise|vectorized|reduce|norm|softmax|copy|cat|upsample|"
                                                  r"interp|index|gather|fill|memcpy|memset"),
]


def categorise(kernel: str) -> str:
    import re

    low = kernel.lower()
    for label, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, low):
            return label
    return "other"


def timed_modules(model: nn.Module, max_depth: int = 2) -> list[tuple[str, nn.Module]]:
    """Modules to time with CUDA events: up to `max_depth` deep, none that is or runs inside a compiled block (a
    hook there would be traced into the compiled region and recompile it). Whole-model compile: none."""
    from lite3r_recon.deploy import compile_regions

    if hasattr(model, "_orig_mod"):
        return []
    inside = {id(m) for region in compile_regions(model) for m in region.modules()}
    return [(fqn, m) for fqn, m in model.named_modules() if fqn and fqn.count(".") < max_depth
            and id(m) not in inside and not isinstance(m, (nn.ModuleList, nn.ModuleDict))]


@contextmanager
def module_timers(model: nn.Module) -> Iterator[dict[str, list]]:
    """CUDA events around the forward of each of `timed_modules(model)`: fqn -> [[start, end], ...]."""
    events: dict[str, list] = {}
    handles = []
    for fqn, module in timed_modules(model):
        def pre(mod, args, fqn=fqn):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.setdefault(fqn, []).append([ev, None])

        def post(mod, args, out, fqn=fqn):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events[fqn][-1][1] = ev

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield events
    finally:
        for h in handles:
            h.remove()


def profile_breakdown(model: nn.Module, images: torch.Tensor, *, top: int = 15) -> dict:
    """Where one (already warm) forward spends its GPU time: per top-level module (CUDA events) and per kernel
    category (torch.profiler), plus the `top` longest kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    device = images.device
    if device.type != "cuda":
        raise ValueError("--profile needs a CUDA device")
    with module_timers(model) as events:
        _sync(device)
        t0 = time.perf_counter()
        forward(model, images)
        _sync(device)
        wall = time.perf_counter() - t0
    modules = {name: sum(a.elapsed_time(b) for a, b in evs if b is not None) / 1e3 for name, evs in events.items()}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        forward(model, images)
        _sync(device)
    kernels: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.device_time / 1e6  # us -> s
    total = sum(kernels.values())
    cats: dict[str, float] = {}
    for name, secs in kernels.items():
        cats[categorise(name)] = cats.get(categorise(name), 0.0) + secs
    return {
        "wall_s": wall,
        "gpu_kernel_s": total,
        "modules_s": modules,
        "categories_s": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_kernels_s": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:top]),
    }


def profile_tables(prof: dict, title: str) -> list:
    from rich.table import Table

    tables = []
    t = Table(title=f"{title}: wall {prof['wall_s']:.4f} s, GPU kernels {prof['gpu_kernel_s']:.4f} s")
    t.add_column("module (CUDA events; nested rows overlap)")
    t.add_column("s", justify="right")
    t.add_column("% of wall", justify="right")
    for name, secs in prof["modules_s"].items():
        t.add_row(name, f"{secs:.4f}", f"{100 * secs / prof['wall_s']:.1f}")
    tables.append(t)
    for key, head in (("categories_s", "kernel category"), ("top_kernels_s", "kernel")):
        t = Table()
        t.add_column(head, overflow="fold", max_width=90)
        t.add_column("s", justify="right")
        t.add_column("% of GPU", justify="right")
        for name, secs in prof[key].items():
            t.add_row(name, f"{secs:.4f}", f"{100 * secs / max(prof['gpu_kernel_s'], 1e-12):.1f}")
        tables.append(t)
    return tables


# -------------------------------------------------------------------------------------- attention alone (early)
def bench_attention(*, views: Sequence[int] = (32,), res: int = 518, topk: float = 0.05, heads: int = 16,
                    head_dim: int = 64, repeats: int = 5, device: str | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """One global attention layer of VGGT at S views (N = S x (patches + 5) tokens): SDPA vs `lite3r.sla_attention`
    (block map + both branches), bf16 on CUDA / fp32 on CPU. Works with the core alone (no backbone needed)."""
    import torch.nn.functional as F

    import lite3r

    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    for s in views:
        n = s * ((res // 14) ** 2 + 5)
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen, device=dev, dtype=dtype) for _ in range(3))
        row = {"views": s, "tokens": n}
        for label, fn in (("sdpa", lambda: F.scaled_dot_product_attention(q, k, v)),
                          ("sla", lambda: lite3r.sla_attention(q, k, v, topk=topk))):
            with torch.inference_mode():
                warm, times, out = time_calls(fn, device=dev, warmup=2, repeats=repeats)
            row[f"{label}_s"] = statistics.median(times)
            row[f"{label}_warmup_s"] = warm
            del out
        row["speedup"] = row["sdpa_s"] / row["sla_s"]
        log(f"attention x{s} ({n} tokens): sdpa {row['sdpa_s'] * 1e3:.2f} ms, sla {row['sla_s'] * 1e3:.2f} ms")
        rows.append(row)
    return {"config": {"views": list(views), "res": res, "topk": topk, "heads": heads, "head_dim": head_dim,
                       "repeats": repeats}, "env": environment(dev), "results": rows}


def attention_table(result: dict):
    from rich.table import Table

    env = result["env"]
    table = Table(title=f"one global attention layer, H={result['config']['heads']} D={result['config']['head_dim']}, "
                        f"topk={result['config']['topk']}", caption=f"{env.get('gpu', env['device'])}, torch {env['torch']}")
    for col in ("views", "tokens", "SDPA ms", "SLA ms", "speed-up"):
        table.add_column(col, justify="right")
    for r in result["results"]:
        table.add_row(str(r["views"]), str(r["tokens"]), f"{r['sdpa_s'] * 1e3:.3f}", f"{r['sla_s'] * 1e3:.3f}",
                      f"{r['speedup']:.2f}")
    return table


# ---------------------------------------------------------------------------------------------- command driver
def main(target: str, cfg: BenchConfig, *, json_path: str | None = None, plot_path: str | None = None,
         profile: bool = False, overwrite: bool = False, console=None) -> dict:
    """What `lite3r bench` does: run, print the tables, write the JSON / plot. Refuses to overwrite files unless
    asked, and checks that before the (long) run."""
    from rich.console import Console

    from lite3r_recon.io import atomic_write_json, ensure_writable

    console = console or Console(width=max(Console().width, 130))  # the table needs ~110 columns; logs are files
    for path in (json_path, plot_path):
        if path:
            ensure_writable(path, overwrite)
    log = lambda msg: console.print(f"[dim]{msg}[/dim]")  # noqa: E731
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
        for views, prof in result.get("profile", {}).items():
            for table in profile_tables(prof, f"profile of ({cfg.variants[-1]}) at {views} views"):
                console.print(table)
        if plot_path:
            plot_sweep(result, plot_path, overwrite=overwrite)
    if json_path:
        atomic_write_json(json_path, result, overwrite=overwrite)
    return result


if __name__ == "__main__":  # pragma: no cover - a quick look without the CLI
    import sys

    from rich.console import Console

    res = run_bench(BenchConfig(model=sys.argv[1] if len(sys.argv) > 1 else "vggt", views=(2,)))
    Console().print(results_table(res))
