#!/bin/bash
# Session 8, second call (issues 17 / 18): GPU tests, chunked-vs-whole parity of the deployed student, VGGT-1B (c) and
# (d) at 32 views compiled and profiled (fused FP8 quantisation on), (d) at 512 / 1024 views with the kept layers in
# FP8, DA3-Large (a) vs (d) at 32 / 128 views (kept layers bf16, then FP8). Eager except the 32-view bench. ~450 s.
source "$(dirname "$0")/common.sh" s8b
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader

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
