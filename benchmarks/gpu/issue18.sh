#!/bin/bash
# Session 7, issue 18 (speed at 32 views): GPU correctness of the fused LayerNorm / GELU + FP8 quantise kernels
# (kernels/fp8_fused.py: real shapes vs the PyTorch twins, opcheck, the fused W8A8 FP8Linear vs unfused, compiled vs
# eager), then VGGT-1B paths (c) SLA and (d) SLA + FP8 at 32 views in one process, each profiled (--profile: GPU
# time by kernel category, module, kernel), and (d)'s output error against (c). RoPE cos/sin are computed once per
# forward in both paths. Budget 200 s of wall time including first-call compile / Triton autotune: every step has
# its own timeout (50 + 135 s + install). Env: FUSE=0 runs (d) without the fused quantisation (LITE3R_FUSE_FP8=0,
# the A/B of the old path).
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-deps --no-build-isolation .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export LITE3R_TYPECHECK=0 LITE3R_FUSE_FP8=${FUSE:-1}
O="$OUT/issue18"
mkdir -p "$O"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
t0=$(date +%s)
step() { echo "== $1 (rc $2, $(( $(date +%s) - t0 )) s so far)"; }

timeout 50 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_fused.py -k "gpu or opcheck or w8a8" \
  > "$O/pytest.log" 2>&1
step "pytest: fused LayerNorm/GELU + FP8 quantise kernels on the GPU" $?
tail -4 "$O/pytest.log"

timeout 135 lite3r bench vggt --views 32 --variants c,d --warmup 2 --repeats 3 --profile \
  --json "$O/vggt32_cd.json" > "$O/vggt32_cd.log" 2>&1
step "bench vggt 32 views, (c) and (d), profiled" $?

python3 - "$O/vggt32_cd.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no bench JSON: {e}")
rows = {r["variant"]: r for r in d["results"]}
for v, r in rows.items():
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
    print(f"({v}) {r['latency_s']:.4f} s (runs {', '.join(f'{t:.4f}' for t in r['latencies_s'])}), warm-up "
          f"{r['warmup_s']:.1f} s, peak {peak}")
if {"c", "d"} <= rows.keys():
    c, dd = rows["c"], rows["d"]
    print(f"(d) vs (c): {c['latency_s'] / dd['latency_s']:.3f}x faster (target >= 1.2x); output rel. error of (d) "
          f"vs (c): depth {dd['depth_rel']:.2e}, extrinsics {dd['extrinsics_rel']:.2e} (random weights)")
for views, by_path in d.get("profile", {}).items():
    cats = list(dict.fromkeys(k for p in by_path.values() for k in p["categories_s"]))
    print(f"GPU s by category at {views} views: " + " | ".join(f"({v}) wall {p['wall_s']:.3f} gpu "
                                                           f"{p['gpu_kernel_s']:.3f}" for v, p in by_path.items()))
    for k in cats:
        print(f"  {k:26s} " + "  ".join(f"({v}) {p['categories_s'].get(k, 0.0):.4f}" for v, p in by_path.items()))
    for v, p in by_path.items():
        print(f"  ({v}) top kernels: " + "; ".join(f"{k['kernel'][:40]} {k['s']:.4f}" for k in p["top_kernels"][:5]))
PY
for f in "$O"/*.log; do grep -h -i -m3 "error\|Traceback\|out of memory\|failed" "$f" | sed "s|^|$(basename $f): |"; done
