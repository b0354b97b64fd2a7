#!/bin/bash
# Session 8, third call: the FP8 row kernels with the exact reciprocal division, unmasked even rows and 2 rows per
# program for LayerNorm (GPU tests, then the sweep's current ops), VGGT-1B (c) / (d) at 32 views compiled (heads 8
# frames at a time again), (d) at 1024 views (kept FP8, eager), DA3-Large (a) / (d) at 32 / 128 views in the memory
# configuration (kept FP8, heads 2 frames at a time). ~330 s.
source "$(dirname "$0")/common.sh" s8c
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
