"""`lite3r bench --profile`: where one forward of a path spends its time, by kernel category and by module."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import time

import torch
from torch import nn

from lite3r_recon.models import infer
from lite3r_recon.timing import sync
from lite3r_recon.errors import InvalidInput

# ------------------------------------------------------------------------------------------------------ profile
KERNEL_CATEGORIES: list[tuple[str, str, str]] = [  # (category, what it holds, pattern); first match wins
    ("attention SLA", "block map, fused sparse + linear kernel", r"sla|block_map|blockmap|lut|sparse"),
    ("attention dense", "SDPA / flash: frame attention, patch embed", r"flash|fmha|attention|attn|sdpa"),
    ("conv", "DPT heads, patch embed", r"conv|cudnn|implicit|winograd|fprop|dgrad"),
    ("GEMM FP8", "_scaled_mm W8A8", r"e4m3|f8f8|fp8.*gemm|gemm.*fp8|qqbf|_qq|scaled_mm"),
    ("GEMM bf16/fp32", "cuBLAS / CUTLASS", r"gemm|matmul|_mm_|cutlass|xmma|nvjet|cublas|splitk|sm90_"),
    ("FP8 quantise", "amax + scale + cast (lite3r _fp8_rows / _op_fp8_rows: fused LayerNorm or GELU; Inductor)",
     r"quant|amax|fp8|float8"),
    ("norms/elementwise Triton", "Inductor: LayerNorm, RoPE, residual, GELU, casts", r"^triton_|triton"),
    ("norms/elementwise ATen", "copies, reductions, softmax, upsample",
     r"elementwise|vectorized|reduce|norm|softmax|copy|cat|upsample|interp|index|gather|fill|memcpy|memset"),
]
DESCRIPTIONS = {name: what for name, what, _ in KERNEL_CATEGORIES}
OTHER = "other"


def categorise(kernel: str) -> str:
    """The category of a CUDA kernel, by its name."""
    import re

    low = kernel.lower()
    for label, _, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, low):
            return label
    return OTHER


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


def summarise(kernels: dict[str, tuple[float, int]], modules_s: dict[str, float], wall_s: float, *,
              top: int = 15) -> dict:
    """The profile JSON from kernel name -> (GPU seconds, calls) and module fqn -> seconds: per category (seconds,
    calls, kernels, % of GPU time, sorted by time), the `top` modules by time and the `top` kernels (with their
    category)."""
    total = sum(secs for secs, _ in kernels.values())
    cats: dict[str, dict] = {}
    for name, (secs, calls) in kernels.items():
        c = cats.setdefault(categorise(name), {"s": 0.0, "calls": 0, "kernels": 0})
        c["s"] += secs
        c["calls"] += calls
        c["kernels"] += 1
    for c in cats.values():
        c["pct_gpu"] = 100 * c["s"] / total if total else 0.0
    by_time = sorted(kernels.items(), key=lambda kv: -kv[1][0])
    return {
        "wall_s": wall_s,
        "gpu_kernel_s": total,
        "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1]["s"])),
        "categories_s": {k: v["s"] for k, v in sorted(cats.items(), key=lambda kv: -kv[1]["s"])},
        "modules_s": modules_s,  # every timed module, in call order
        "top_modules_s": dict(sorted(modules_s.items(), key=lambda kv: -kv[1])[:top]),
        "top_kernels": [{"kernel": n, "category": categorise(n), "s": secs, "calls": calls}
                        for n, (secs, calls) in by_time[:top]],
        "top_kernels_s": {n: secs for n, (secs, _) in by_time[:top]},
    }


def profile_breakdown(model: nn.Module, images: torch.Tensor, *, top: int = 15) -> dict:
    """Where one (already warm) forward spends its GPU time: per module (CUDA events around the modules outside
    the compiled blocks) and per kernel category (torch.profiler), plus the `top` longest kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    device = images.device
    if device.type != "cuda":
        raise InvalidInput("--profile needs a CUDA device")
    with module_timers(model) as events:
        sync(device)
        t0 = time.perf_counter()
        infer(model, images)
        sync(device)
        wall = time.perf_counter() - t0
    modules = {name: sum(a.elapsed_time(b) for a, b in evs if b is not None) / 1e3 for name, evs in events.items()}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        infer(model, images)
        sync(device)
    kernels: dict[str, tuple[float, int]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            secs, calls = kernels.get(ev.name, (0.0, 0))
            kernels[ev.name] = (secs + ev.device_time / 1e6, calls + 1)  # us -> s
    return summarise(kernels, modules, wall, top=top)


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}" if whole > 0 else "-"


def profile_tables(prof: dict, title: str) -> list:
    """One path's profile as rich tables: time by kernel category, the top modules, the top kernels."""
    from rich.table import Table

    gpu, wall = prof["gpu_kernel_s"], prof["wall_s"]
    cats = prof.get("categories") or {k: {"s": v, "calls": None, "kernels": None} for k, v in
                                       prof["categories_s"].items()}
    t = Table(title=f"{title}: wall {wall:.4f} s, GPU kernels {gpu:.4f} s")
    for col, justify in (("kernel category", "left"), ("s", "right"), ("% of GPU", "right"), ("calls", "right"),
                         ("kernels", "right"), ("what", "left")):
        t.add_column(col, justify=justify, overflow="fold", max_width=60 if col == "what" else None)
    for name, c in cats.items():
        t.add_row(name, f"{c['s']:.4f}", _pct(c["s"], gpu), "-" if c["calls"] is None else f"{c['calls']:,}",
                  "-" if c["kernels"] is None else str(c["kernels"]), DESCRIPTIONS.get(name, ""))
    tables = [t]
    t = Table(title="by module (CUDA events around the modules outside the compiled blocks; nested rows overlap)")
    t.add_column("module")
    t.add_column("s", justify="right")
    t.add_column("% of wall", justify="right")
    for name, secs in (prof.get("top_modules_s") or prof["modules_s"]).items():
        t.add_row("  " * name.count(".") + name, f"{secs:.4f}", _pct(secs, wall))
    tables.append(t)
    t = Table(title="top kernels")
    t.add_column("kernel", overflow="fold", max_width=70)
    t.add_column("category", overflow="fold", max_width=28)
    t.add_column("s", justify="right")
    t.add_column("% of GPU", justify="right")
    t.add_column("calls", justify="right")
    top = prof.get("top_kernels") or [{"kernel": n, "category": categorise(n), "s": v, "calls": None}
                                      for n, v in prof["top_kernels_s"].items()]
    for k in top:
        t.add_row(k["kernel"], k["category"], f"{k['s']:.4f}", _pct(k["s"], gpu),
                  "-" if k["calls"] is None else str(k["calls"]))
    tables.append(t)
    return tables


def compare_table(profiles: dict[str, dict], title: str):
    """Paths side by side: seconds per kernel category for each profiled path (the first path is the baseline of
    the last column)."""
    from rich.table import Table

    paths = list(profiles)
    cats = list(dict.fromkeys(c for p in profiles.values() for c in p["categories_s"]))
    t = Table(title=title)
    t.add_column("kernel category")
    for p in paths:
        t.add_column(f"({p}) s", justify="right")
    if len(paths) > 1:
        t.add_column(f"({paths[-1]}) - ({paths[0]}) s", justify="right")
    for c in cats + ["GPU kernels", "wall"]:
        vals = [p["gpu_kernel_s"] if c == "GPU kernels" else p["wall_s"] if c == "wall" else
                p["categories_s"].get(c, 0.0) for p in profiles.values()]
        row = [c] + [f"{v:.4f}" for v in vals]
        if len(paths) > 1:
            row.append(f"{vals[-1] - vals[0]:+.4f}")
        t.add_row(*row)
    return t
