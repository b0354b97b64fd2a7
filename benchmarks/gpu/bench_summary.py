"""One line per path of `lite3r bench --json` files (latency, runs, peak, ratios, output error), and with
`--profile` data the GPU seconds by category and the top kernels: what the session scripts print.

    python3 benchmarks/gpu/bench_summary.py out1.json [out2.json ...]
"""
import json
import sys


def summarize(path: str) -> None:
    try:
        d = json.load(open(path))
    except Exception as e:  # a bench that timed out leaves no JSON: say so and go on
        print(f"{path}: no JSON ({e})")
        return
    for r in d["results"]:
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
        print(f"{d['backbone']} x{r['views']} ({r['variant']}{' kept fp8' if r.get('kept_fp8') else ''}) "
              f"{r['latency_s']:.4f} s (runs {', '.join(f'{t:.4f}' for t in r.get('latencies_s', []))}), peak {peak}, "
              f"x a {r.get('speedup_vs_a') or 0:.2f}, mem a/x {r.get('mem_ratio_vs_a') or 0:.2f}, "
              f"depth err {r.get('depth_rel', 0):.2e}, extr err {r.get('extrinsics_rel', 0):.2e}")
    for views, by_path in d.get("profile", {}).items():
        cats = list(dict.fromkeys(k for p in by_path.values() for k in p["categories_s"]))
        for k in cats:
            print(f"  {k:26s} " + "  ".join(f"({v}) {p['categories_s'].get(k, 0.0):.4f}" for v, p in by_path.items()))
        for v, p in by_path.items():
            print(f"  ({v}) top kernels: " + "; ".join(f"{k['kernel'][:34]} {k['s']:.4f}" for k in p["top_kernels"][:6]))


if __name__ == "__main__":
    for f in sys.argv[1:]:
        summarize(f)
