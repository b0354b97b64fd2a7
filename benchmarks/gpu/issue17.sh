#!/bin/bash
# Session 7, issue 17 (1024 views): GPU checks of the chunked select kernel (rows past 16384 key blocks), the FP8
# kept layers, then VGGT-1B path (d) at 512 and 1024 views with (b) estimated from its per-layer cost, and DA3-Large
# memory (a) vs (d) at 32 and 128 views. Budget 240 s of wall time: every step has its own timeout (sum 215 s + install).
# Env: KEPT (SLA kept key blocks per query block, default 64: the sparse cost linear in the views),
# COMPILE (torch.compile mode of (b)-(d), default none: eager, no compile time inside the budget).
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-deps --no-build-isolation .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
KEPT=${KEPT:-64}
COMPILE=${COMPILE:-none}
O="$OUT/issue17"
mkdir -p "$O"
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
t0=$(date +%s)
step() { echo "== $1 (rc $2, $(( $(date +%s) - t0 )) s so far)"; }

timeout 45 python3 -m pytest -q -p no:cacheprovider tests/test_block_map_tiled.py tests/test_kept_fp8.py -k gpu \
  > "$O/pytest.log" 2>&1
step "pytest -k gpu: block map tiled / chunked select at 1024 views, kept FP8" $?
tail -3 "$O/pytest.log"

B="--variants b,d --kept-blocks $KEPT --warmup 1 --repeats 1 --compile-mode $COMPILE --dense-max-views 256"
timeout 50 lite3r bench vggt --views 512 $B --json "$O/vggt_512.json" > "$O/vggt_512.log" 2>&1
step "bench vggt 512 views" $?
timeout 80 lite3r bench vggt --views 1024 $B --json "$O/vggt_1024.json" > "$O/vggt_1024.log" 2>&1
step "bench vggt 1024 views" $?
timeout 40 lite3r bench da3 --views 32,128 --variants a,d --kept-blocks $KEPT --warmup 1 --repeats 1 \
  --compile-mode $COMPILE --json "$O/da3_32_128.json" > "$O/da3.log" 2>&1
step "bench da3 32,128 views" $?

python3 - "$O" <<'PY'
import glob, json, os, sys
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    d = json.load(open(f))
    for r in d["results"]:
        est = " (estimated: " + ", ".join(f"{g['calls']}x{g['scope']} {g['seconds']:.3f}s" for g in
                                          r["estimate"]["groups"]) + ")" if r.get("estimated") else ""
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
        print(f"{d['backbone']} x{r['views']} ({r['variant']}) {r['latency_s']:.3f} s, peak {peak}, "
              f"x a {r.get('speedup_vs_a') or 0:.2f}, x b {r.get('speedup_vs_b') or 0:.2f}, "
              f"mem a/x {r.get('mem_ratio_vs_a') or 0:.2f}, "
              f"K {r.get('kept_blocks')}/{r.get('key_blocks')}{est}")
PY
for f in "$O"/*.log; do grep -h -i -m3 "error\|Traceback\|out of memory" "$f" | sed "s|^|$(basename $f): |"; done
