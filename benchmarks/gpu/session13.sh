#!/bin/bash
# Next (issue 17): the in-place residual stream and half-at-a-time kept layers of session 12 (CPU-verified), measured:
# DA3-Large at 32 / 128 views (a) vs (d) (target >= 2.5x / >= 3x less memory than (a)), what is alive at DA3's peak
# at 128 views, and VGGT-1B (d) at 1024 views (was 38.78 GiB / 24.23 s).
source "$(dirname "$0")/common.sh" s13
timeout 200 lite3r bench da3 --views 32,128 --variants a,d --kept-blocks 64 --warmup 1 --repeats 1 --compile-mode none \
  --kept-fp8 --head-frames 2 --json "$O/da3.json" > "$O/da3.log" 2>&1
step "bench da3" $?; tail -12 "$O/da3.log"
timeout 120 python3 benchmarks/gpu/memory_peak.py da3 --views 128 --variant d --kept-blocks 64 --kept-fp8 \
  --head-frames 2 --json "$O/da3-peak.json" > "$O/da3-peak.log" 2>&1
step "memory_peak da3 128" $?; head -25 "$O/da3-peak.log"
timeout 200 lite3r bench vggt --views 1024 --variants d --kept-blocks 64 --warmup 1 --repeats 1 --compile-mode none \
  --kept-fp8 --json "$O/vggt1024.json" > "$O/vggt1024.log" 2>&1
step "bench vggt 1024" $?; tail -8 "$O/vggt1024.log"
tar -cf "$OUT/s13.tar" -C "$OUT" s13 && rm -rf "$O"
