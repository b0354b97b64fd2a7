"""Timing and environment helpers of the benchmarks: synchronised wall-clock calls (warm-up apart from the
measured repeats), relative errors, the device and software a number was measured on."""
from __future__ import annotations

import contextlib
import functools
import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_calls(fn: Callable[[], Any], *, device: torch.device, warmup: int, repeats: int) -> tuple[float, list[float], Any]:
    """Run `fn` warmup + repeats times; return (total warm-up seconds, per-repeat seconds, last output)."""
    out = None
    sync(device)
    start = time.perf_counter()
    for _ in range(warmup):
        out = None  # free the previous output before the next call: it would count in the peak
        out = fn()
    sync(device)
    warm = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        out = None
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
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


def forward_flops(model: torch.nn.Module, views: int, hw: tuple[int, int], patch: int = 14) -> float:
    """Rough FLOPs of one forward of a ViT backbone on `views` images of `hw`: 2 x linear weights x tokens, plus
    4 x tokens^2 x width per attention layer (global layers: all views' tokens at once, frame layers: one view's).
    The heads and SLA's savings are left out: an order of magnitude, for 'this takes ~N min' notes."""
    import lite3r

    per_view = (hw[0] // patch) * (hw[1] // patch)
    tokens = views * per_view
    linears = [m for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]  # FP8 too
    flops = 2.0 * sum(m.in_features * m.out_features for m in linears) * tokens
    for m in model.modules():
        if lite3r.is_attention(m) or isinstance(m, lite3r.SLAAttention):
            width = next((c.in_features for c in m.modules() if hasattr(c, "in_features")), 0)
            n = per_view if getattr(m, "scope", "global") == "frame" else tokens
            flops += 4.0 * n * n * width * (tokens // n)
    return flops


@functools.lru_cache(maxsize=1)
def cpu_flops_per_second() -> float:
    """What this CPU sustains on fp32 matmuls (measured once, ~0.1 s)."""
    a = torch.randn(512, 512)
    a @ a
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.1:
        a @ a
        n += 1
    return n * 2 * 512**3 / (time.perf_counter() - t0)


def cpu_estimate(model: torch.nn.Module, views: int, hw: tuple[int, int], calls: int = 1) -> float | None:
    """Seconds `calls` forwards of `model` (on the CPU) would take, roughly; None on a GPU (no note needed)."""
    device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
    if device.type != "cpu":
        return None
    return calls * forward_flops(model, views, hw) / cpu_flops_per_second()


LONG_S = 20.0  # steps estimated longer than this get a note before they start


def long_note(what: str, seconds: float | None) -> str | None:
    """'WHAT: about N min on this CPU (a rough estimate)' for a step estimated over LONG_S, else None."""
    if seconds is None or seconds < LONG_S:
        return None
    took = f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
    return f"{what}: about {took} on this CPU (a rough estimate)"


@contextlib.contextmanager
def long_step(what: str, seconds: float | None, *, quiet: bool = False) -> Iterator[None]:
    """Around a step that may run minutes with no output of its own: its long_note on stderr before it starts, and a
    spinner with the elapsed time while it runs (on a terminal; a log gets the note alone)."""
    from rich.markup import escape

    from lite3r_recon.io import console

    con = console(quiet, stderr=True)
    what = escape(what)
    note = long_note(what, seconds)
    if note:
        con.print(note)
    if quiet or not con.is_terminal or seconds is None or seconds < LONG_S:
        yield
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn(what), TimeElapsedColumn(), console=con, transient=True) as progress:
        progress.add_task(what, total=None)
        yield


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
