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
