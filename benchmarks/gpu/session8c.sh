#!/bin/bash
# Session 8, third call: the FP8 row kernels with the exact reciprocal division, unmasked even rows and 2 rows per
# program for LayerNorm (GPU tests, then the sweep's current ops), VGGT-1B (c) / (d) at 32 views compiled (heads 8
# frames at a time again), (d) at 1024 views (kept FP8, eager), DA3-Large (a) / (d) at 32 / 128 views in the memory
# configuration (kept FP8, heads 2 frames at a time). ~330 s.
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-deps --no-build-isolation .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export LITE3R_TYPECHECK=0
O="$OUT/s8c"
mkdir -p "$O"
t0=$(date +%s)
step() { echo "== $1 (rc $2, $(( $(date +%s) - t0 )) s so far)"; }
summ() { python3 - "$@" <<'PY'
import json, sys
for f in sys.argv[1:]:
    try:
        d = json.load(open(f))
    except Exception as e:
        print(f"{f}: no JSON ({e})"); continue
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
PY
}
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_fused.py tests/test_kernels_fp8.py -k "gpu" \
  > "$O/pytest.log" 2>&1
step "pytest -k gpu: FP8 row kernels" $?
tail -2 "$O/pytest.log"; grep -h "AssertionError\|Error" "$O/pytest.log" | head -6

timeout 140 lite3r bench vggt --views 32 --variants c,d --warmup 2 --repeats 3 --profile \
  --json "$O/vggt32_cd.json" > "$O/vggt32_cd.log" 2>&1
step "bench vggt 32 views, (c) and (d), compiled, profiled" $?
summ "$O/vggt32_cd.json"

timeout 100 lite3r bench vggt --views 1024 --variants d --kept-blocks 64 --warmup 1 --repeats 1 --compile-mode none \
  --kept-fp8 --json "$O/vggt_1024_fp8.json" > "$O/vggt_1024_fp8.log" 2>&1
step "bench vggt (d) 1024 views, kept FP8" $?
summ "$O/vggt_1024_fp8.json"

timeout 50 lite3r bench da3 --views 32,128 --variants a,d --kept-blocks 64 --warmup 1 --repeats 2 --compile-mode none \
  --kept-fp8 --head-frames 2 --json "$O/da3_mem.json" > "$O/da3_mem.log" 2>&1
step "bench da3 32,128 views (a), (d) kept FP8, heads 2 frames" $?
summ "$O/da3_mem.json"
for f in "$O"/*.log; do grep -h -i -m3 "error\|Traceback\|out of memory" "$f" | sed "s|^|$(basename $f): |"; done
