"""`lite3r bench attention`: one global attention layer of VGGT alone, SDPA vs lite3r.sla_attention."""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

from lite3r_recon.models import resolve_device
from lite3r_recon.timing import environment, time_calls

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
