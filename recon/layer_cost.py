"""A forward's latency at a view count too large to run, from the measured cost of its layers (`lite3r bench`'s
estimated dense rows, issue 17).

    est = estimate_latency(model, lambda imgs: models.infer(model, imgs), views=1024, res=518, device=cuda)

Two small forwards (2 and 4 views) record every call of every repeated block (`deploy.repeated_blocks`: patch
embed, frame, global, camera-trunk blocks) with its inputs; the sizes that differ between the two grow linearly in
the views, which gives each call's input shapes at `views`. Calls of one block class, weights' shapes and input
shapes cost the same, so one of each such group is timed (eagerly) on inputs tiled to those shapes and counted as
often as it is called. A group too large to time whole (past `direct_views`) is timed at 1/8 and 1/4 of its
growing sizes and extrapolated with t(m) = a m + b m^2 (a linear part and attention's quadratic one, a, b >= 0).
The rest (heads, glue) is the 4-view forward's time less its blocks', scaled linearly. Memory is not estimated.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lite3r_recon.deploy import repeated_blocks
from lite3r_recon.timing import sync

CALIBRATION_VIEWS = (2, 4)


def _record(model: nn.Module, run: Callable[[Tensor], object], images: Tensor) -> tuple[list, float]:
    """Every block call of one forward on `images`: [(block, args, kwargs)], and the forward's seconds."""
    calls: list = []
    hooks = [b.register_forward_pre_hook(lambda m, a, k: calls.append((m, a, dict(k))), with_kwargs=True)
             for b in repeated_blocks(model)]
    try:
        run(images)  # warm (first-call allocations, cuDNN choices), then the timed one
        calls.clear()
        sync(images.device)
        t0 = time.perf_counter()
        run(images)
        sync(images.device)
        return calls, time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()


def _scaled(t1, t2, v1: int, v2: int, views: float):
    """The shape of a call's tensor argument at `views`, from its shapes at v1 and v2 views (linear per dim)."""
    return tuple(a + (b - a) * (views - v1) // (v2 - v1) for a, b in zip(t1.shape, t2.shape))


def _grow(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """t tiled (or cut) to `shape` along every dim that differs: inputs of the right size for timing."""
    for d, n in enumerate(shape):
        if t.shape[d] != n:
            reps = [1] * t.ndim
            reps[d] = -(-n // t.shape[d])
            t = t.repeat(*reps).narrow(d, 0, n)
    return t


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _signature(block: nn.Module, shapes: list) -> tuple:
    return (type(block), getattr(getattr(block, "attn", block), "scope", None),
            tuple(tuple(p.shape) for p in block.parameters()), tuple(shapes))


def estimate_latency(model: nn.Module, run: Callable[[Tensor], object], views: int, *, res: int,
                     device: torch.device, autocast: torch.dtype | None = None, direct_views: int = 128,
                     repeats: int = 2, log: Callable[[str], None] | None = None) -> dict:
    """Seconds one forward `run(images)` of `model` on 1 x views x 3 x res x res images would take (see the module
    docstring); blocks are timed under `autocast` to that dtype when given, as `run` runs them:
    {"latency_s", "blocks_s", "rest_s", "groups": [{"block", "scope", "calls", "shapes", "seconds", "how"}],
    "method"}."""
    v1, v2 = CALIBRATION_VIEWS
    gen = torch.Generator().manual_seed(0)
    rec = {}
    for v in (v1, v2):
        images = torch.rand(1, v, 3, res, res, generator=gen).to(device)
        rec[v] = _record(model, run, images)
    (calls1, _), (calls2, t_fwd2) = rec[v1], rec[v2]
    if len(calls1) != len(calls2) or any(a[0] is not b[0] for a, b in zip(calls1, calls2)):
        raise RuntimeError("the blocks are called differently at 2 and 4 views: no per-layer estimate")
    groups: dict[tuple, dict] = {}
    for (block, a1, k1), (_, a2, k2) in zip(calls1, calls2):
        names = [i for i, x in enumerate(a2) if isinstance(x, Tensor)] + [k for k, x in k2.items()
                                                                            if isinstance(x, Tensor)]
        pairs = [((a1[n], a2[n]) if isinstance(n, int) else (k1[n], k2[n])) for n in names]
        shapes = [_scaled(x1, x2, v1, v2, views) for x1, x2 in pairs]
        g = groups.setdefault(_signature(block, shapes), {"block": block, "calls": 0, "args": (a2, k2),
                                                          "names": names, "shapes": shapes})
        g["calls"] += 1

    def time_at(g: dict, frac: float) -> float:
        a2, k2 = g["args"]
        args, kwargs = list(a2), dict(k2)
        for n, shape, ref in zip(g["names"], g["shapes"],
                                 [a2[n] if isinstance(n, int) else k2[n] for n in g["names"]]):
            want = tuple(max(s2, round(s * frac)) if s != s2 else s for s, s2 in zip(shape, ref.shape))
            t = _grow(ref, want)
            if isinstance(n, int):
                args[n] = t
            else:
                kwargs[n] = t
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast or torch.float32,
                                                    enabled=autocast is not None):
            return _time(lambda: g["block"](*args, **kwargs), device, repeats)

    out_groups, blocks_s, blocks_s2 = [], 0.0, 0.0
    for g in groups.values():
        if views <= direct_views:
            t, how = time_at(g, 1.0), "timed at full size"
        else:
            t1, t2 = time_at(g, 1 / 8), time_at(g, 1 / 4)  # t(m) = a m + b m^2 through m/8 and m/4, a, b >= 0
            quad, lin = 32 * (t2 - 2 * t1), 16 * t1 - 4 * t2
            t = 16 * t2 if lin < 0 else 4 * t2 if quad < 0 else lin + quad
            how = f"a m + b m^2 from 1/8 ({t1 * 1e3:.2f} ms) and 1/4 ({t2 * 1e3:.2f} ms) of its growing sizes"
        blocks_s += g["calls"] * t
        scope = _signature(g["block"], [])[1]
        out_groups.append({"block": type(g["block"]).__name__, "scope": scope, "calls": g["calls"],
                           "shapes": [list(s) for s in g["shapes"]], "seconds": t, "how": how})
        if log:
            log(f"  estimate: {g['calls']} x {type(g['block']).__name__} ({scope}) at {g['shapes'][0]}: "
                f"{t * 1e3:.1f} ms each ({how})")
    # blocks at the 4-view calibration: the rest of that forward (heads, glue) grows linearly in the views
    for g in groups.values():
        a2, k2 = g["args"]
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast or torch.float32,
                                                    enabled=autocast is not None):
            blocks_s2 += g["calls"] * _time(lambda: g["block"](*a2, **k2), device, repeats)
    rest_s = max(t_fwd2 - blocks_s2, 0.0) * views / v2
    return {"latency_s": blocks_s + rest_s, "blocks_s": blocks_s, "rest_s": rest_s, "groups": out_groups,
            "method": f"per-layer cost: blocks timed eagerly at their {views}-view shapes (or extrapolated), "
                      f"heads and glue scaled from a {v2}-view forward"}
