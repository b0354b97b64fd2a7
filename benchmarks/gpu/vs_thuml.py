"""The fused SLA forward against the public thu-ml SLA kernel (issue 17: >= 1.3x at 8, 32 and 128 views), both
with their linear branch and proj_l, at VGGT-1B's global-attention shapes (H 16, D 64, bf16, topk 0.05).

    bash benchmarks/gpu/thuml_wheel.sh <thu-ml/SLA git dir>   # here: the wheel into .whl/ (carried to the GPU)
    python3 benchmarks/gpu/vs_thuml.py --views 8 32 128 [--json out.json]

Rows (ms, triton.testing.do_bench medians, inference mode): ours as lite3r deploys it (lite3r.sla_attention with
nothing to differentiate: block map + linear state + the one-buffer forward, kernels.sla_output), ours through the
differentiable entry (sla_branches + proj_l, what training runs), theirs (SparseLinearAttention.forward: block map,
sparse kernel, linear branch in PyTorch, proj_l); the ratio is theirs / ours. Each is timed twice: as an eager
call (what the host's Python costs is in it: at 8 views that, not the GPU, is what session 14 timed) and replayed
from a CUDA graph captured of that call (the GPU work alone, as a compiled / graphed model runs it); a path that
cannot be captured (a host sync) says so in its row.
"""
from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import triton.testing
    from sparse_linear_attention import SparseLinearAttention

    import lite3r
    import lite3r_kernels as kernels

    H, D = 16, 64

    def graph_ms(fn):
        """do_bench of a CUDA graph replay of fn (captured after warm-up calls), or the capture's error."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            return float(triton.testing.do_bench(g.replay, warmup=200, rep=200))
        except Exception as e:  # noqa: BLE001 - reported in the row, the eager timing stands
            return f"not capturable: {type(e).__name__}: {str(e).splitlines()[0][:120]}"

    def ratio(a, b):
        return a / b if isinstance(a, float) and isinstance(b, float) else None

    def with_autocast(linear, x):  # an fp32 proj_l on bf16 features, as thu-ml's module runs its own
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear(x)

    rows = []
    for views in a.views:
        N = views * 1374
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        theirs = SparseLinearAttention(D, a.topk, feature_map="softmax", BLKQ=64, BLKK=64).cuda()
        proj_l = torch.nn.Linear(D, D).cuda()
        with torch.no_grad():  # the same nonzero proj_l in both: the linear branch really is added
            proj_l.weight.normal_(0, 0.05)
            theirs.proj_l.weight.copy_(proj_l.weight)
            theirs.proj_l.bias.copy_(proj_l.bias)
        with torch.inference_mode():
            fns = {
                "ours (deployed)": lambda: lite3r.sla_attention(q, k, v, topk=a.topk, proj_l=proj_l),
                "ours (sla_branches + proj_l)": lambda: (lambda o: o[0] + with_autocast(proj_l, o[1]))(
                    kernels.sla_branches(q, k, v, topk=a.topk)),
                "thu-ml": lambda: theirs(q, k, v),
            }
            # warm-up 500 ms: the first shape is the process's first GPU work (session 14's first run timed
            # its 8-view row slower than its 32-view one: clocks still ramping)
            ms = {name: float(triton.testing.do_bench(fn, warmup=500, rep=200)) for name, fn in fns.items()}
            graphed = {name: graph_ms(fn) for name, fn in fns.items()}
            o_ours, o_theirs = fns["ours (deployed)"](), fns["thu-ml"]()
        row = {"views": views, "tokens": N, **{f"{n} ms": t for n, t in ms.items()},
               **{f"{n} graphed ms": t for n, t in graphed.items()},
               "thu-ml / ours (deployed)": ms["thu-ml"] / ms["ours (deployed)"],
               "graphed thu-ml / ours (deployed)": ratio(graphed["thu-ml"], graphed["ours (deployed)"]),
               "outputs finite": bool(torch.isfinite(o_ours).all() and torch.isfinite(o_theirs).all())}
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "topk": a.topk,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
