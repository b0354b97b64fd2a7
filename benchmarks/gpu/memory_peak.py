"""What is alive at the peak of one forward: the CUDA allocations live at the moment of peak memory, grouped by the
line of lite3r code that made them (torch.cuda.memory._record_memory_history, replayed).

    python benchmarks/gpu/memory_peak.py vggt --views 1024 --variant d --kept-blocks 64 [--kept-fp8] [--head-frames 2]
        [--chunk-tokens 16384] [--json out.json]

Prints the peak, the weights and inputs allocated before the forward, and the top groups (MiB, count, file:line
function) of the live set at the peak; writes the same as JSON. Eager (no torch.compile): Inductor's buffers would
be attributed to its generated code, not to ours.
"""
from __future__ import annotations

import argparse
import collections
import json
import os

import torch

OURS = ("lite3r.py", "/backbones/", "/kernels/", "/recon/", "/cli/")


def user_frame(frames: list[dict]) -> str:
    """The innermost frame in lite3r's code (else the innermost frame at all)."""
    for f in frames:
        name = f.get("filename", "")
        if any(o in name for o in OURS) and "site-packages/torch" not in name:
            return f"{name.split('/')[-2]}/{os.path.basename(name)}:{f.get('line')} {f.get('name')}"
    return f"{frames[0].get('filename', '?')}:{frames[0].get('line')}" if frames else "?"


def live_at_peak(trace: list[dict]) -> tuple[int, dict[int, dict]]:
    """Replay alloc / free events: (peak bytes, {addr: event} alive at the peak)."""
    cur, peak, peak_at = 0, 0, -1
    live: dict[int, dict] = {}
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak:
                peak, peak_at = cur, i
        elif e["action"] in ("free_requested",) and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    live, cur = {}, 0
    for e in trace[:peak_at + 1]:  # the live set at that moment
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    return peak, live


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["vggt", "da3"])
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--variant", default="d")
    ap.add_argument("--kept-blocks", type=int, default=None)
    ap.add_argument("--kept-fp8", action="store_true")
    ap.add_argument("--head-frames", type=int, default=None)
    ap.add_argument("--chunk-tokens", type=int, default=None)
    ap.add_argument("--res", type=int, default=518)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from lite3r_cli.bench import BenchConfig, build_variant, resolve_backbone_for
    from lite3r_recon import models

    device = torch.device("cuda")
    cfg = BenchConfig(model=a.model, views=(a.views,), res=a.res, kept_blocks=a.kept_blocks, variants=(a.variant,),
                      compile_mode=None, kept_fp8=a.kept_fp8, head_frames=a.head_frames,
                      chunk_tokens=a.chunk_tokens)
    name = resolve_backbone_for(a.model, device)
    model = build_variant(a.variant, name, cfg, device)
    images = torch.rand(1, a.views, 3, a.res, a.res, generator=torch.Generator().manual_seed(0)).to(device)
    models.infer(model, images[:, :2])  # first-call work (autotuning, probes) outside the recorded forward
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    out = models.infer(model, images)
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak_allocator = torch.cuda.max_memory_allocated()
    trace = snap["device_traces"][device.index or 0]
    peak, live = live_at_peak(trace)
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for e in live.values():
        g = groups[user_frame(e.get("frames", []))]
        g[0] += e["size"]
        g[1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[:a.top]
    MiB = 2**20
    print(f"{name} x{a.views} ({a.variant}{', kept fp8' if a.kept_fp8 else ''}): peak {peak_allocator / MiB:,.0f} MiB "
          f"(allocator), before the forward {before / MiB:,.0f} MiB (weights + images), peak of the forward's own "
          f"allocations {peak / MiB:,.0f} MiB; outputs {sum(v.numel() * v.element_size() for v in out.values() if isinstance(v, torch.Tensor)) / MiB:,.0f} MiB")
    for where, (size, count) in top:
        print(f"  {size / MiB:10,.1f} MiB  {count:5d}  {where}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": name, "views": a.views, "variant": a.variant, "kept_fp8": a.kept_fp8,
                       "peak_mib": peak_allocator / MiB, "before_mib": before / MiB, "forward_peak_mib": peak / MiB,
                       "top": [{"where": w, "mib": s / MiB, "count": c} for w, (s, c) in top]}, f, indent=1)


if __name__ == "__main__":
    main()
