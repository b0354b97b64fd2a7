#!/bin/bash
# Session 8, second call (issues 17 / 18): GPU tests, chunked-vs-whole parity of the deployed student, VGGT-1B (c) and
# (d) at 32 views compiled and profiled (fused FP8 quantisation on), (d) at 512 / 1024 views with the kept layers in
# FP8, DA3-Large (a) vs (d) at 32 / 128 views (kept layers bf16, then FP8). Eager except the 32-view bench. ~450 s.
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-deps --no-build-isolation .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export LITE3R_TYPECHECK=0
O="$OUT/s8b"
mkdir -p "$O"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
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
PY
}

timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_fused.py tests/test_kept_fp8.py -k "gpu" \
  > "$O/pytest.log" 2>&1
step "pytest -k gpu: fused FP8 kernels, kept FP8" $?
tail -2 "$O/pytest.log"; grep -h "AssertionError" "$O/pytest.log" | head -4

timeout 60 python3 benchmarks/gpu/chunk_parity.py vggt --views 48 > "$O/parity.log" 2>&1
step "chunked vs whole, vggt (d) x48" $?
cat "$O/parity.log" | tail -8

timeout 140 lite3r bench vggt --views 32 --variants c,d --warmup 2 --repeats 3 --profile \
  --json "$O/vggt32_cd.json" > "$O/vggt32_cd.log" 2>&1
step "bench vggt 32 views, (c) and (d), compiled, profiled" $?
summ "$O/vggt32_cd.json"
python3 - "$O/vggt32_cd.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for views, by_path in d.get("profile", {}).items():
    cats = list(dict.fromkeys(k for p in by_path.values() for k in p["categories_s"]))
    for k in cats:
        print(f"  {k:26s} " + "  ".join(f"({v}) {p['categories_s'].get(k, 0.0):.4f}" for v, p in by_path.items()))
PY

B="--variants d --kept-blocks 64 --warmup 1 --repeats 1 --compile-mode none --kept-fp8"
timeout 75 lite3r bench vggt --views 1024 $B --json "$O/vggt_1024_fp8.json" > "$O/vggt_1024_fp8.log" 2>&1
step "bench vggt (d) 1024 views, kept FP8" $?
timeout 45 lite3r bench vggt --views 512 $B --json "$O/vggt_512_fp8.json" > "$O/vggt_512_fp8.log" 2>&1
step "bench vggt (d) 512 views, kept FP8" $?
summ "$O/vggt_1024_fp8.json" "$O/vggt_512_fp8.json"

D="--variants a,d --kept-blocks 64 --warmup 1 --repeats 2 --compile-mode none"
timeout 50 lite3r bench da3 --views 32,128 $D --json "$O/da3.json" > "$O/da3.log" 2>&1
step "bench da3 32,128 views (a), (d)" $?
timeout 50 lite3r bench da3 --views 32,128 $D --kept-fp8 --json "$O/da3_fp8.json" > "$O/da3_fp8.log" 2>&1
step "bench da3 32,128 views (a), (d) kept FP8" $?
summ "$O/da3.json" "$O/da3_fp8.json"
for f in "$O"/*.log; do grep -h -i -m3 "error\|Traceback\|out of memory" "$f" | sed "s|^|$(basename $f): |"; done
