"""Timing and environment helpers of the benchmarks: synchronised wall-clock calls (warm-up apart from the
measured repeats), relative errors, the device and software a number was measured on."""
from __future__ import annotations

import gc
import time
from collections.abc import Callable
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
