#!/bin/bash
# Session 8 (issues 17 / 18): GPU tests of the fused FP8 kernels and the kept FP8 layers, the fused-quantise kernel
# sweep (fp8_rows_sweep.py), what is alive at the peak of (d) (memory_peak.py: DA3-Large at 32 views, VGGT-1B at 256),
# then VGGT-1B (d) at 1024 views with the token-chunked inference (kept layers bf16, then FP8) and at 512 (FP8).
# Eager (--compile-mode none), K = 64 kept key blocks per query block. Every step has its own timeout (~420 s).
source "$(dirname "$0")/common.sh" s8
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader

timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_fused.py tests/test_kept_fp8.py -k "gpu" \
  > "$O/pytest.log" 2>&1
step "pytest -k gpu: fused FP8 kernels, kept FP8" $?
tail -3 "$O/pytest.log"; grep -h "AssertionError" "$O/pytest.log" | head -4

if [ -f benchmarks/gpu/fp8_rows_sweep.py ]; then
  timeout 90 python3 benchmarks/gpu/fp8_rows_sweep.py "$O/fp8_rows_sweep.json" > "$O/sweep.log" 2>&1
  step "fused FP8 quantise kernel sweep" $?
  cat "$O/sweep.log" | tail -60
fi

timeout 60 python3 benchmarks/gpu/memory_peak.py da3 --views 32 --kept-blocks 64 --json "$O/mem_da3_32.json" \
  > "$O/mem_da3.log" 2>&1
step "memory at the peak: da3-large (d) x32" $?
cat "$O/mem_da3.log" | tail -22
timeout 70 python3 benchmarks/gpu/memory_peak.py vggt --views 256 --kept-blocks 64 --json "$O/mem_vggt_256.json" \
  > "$O/mem_vggt.log" 2>&1
step "memory at the peak: vggt-1b (d) x256" $?
cat "$O/mem_vggt.log" | tail -22

B="--variants d --kept-blocks 64 --warmup 1 --repeats 1 --compile-mode none"
timeout 80 lite3r bench vggt --views 1024 $B --json "$O/vggt_1024.json" > "$O/vggt_1024.log" 2>&1
step "bench vggt (d) 1024 views, kept layers bf16" $?
grep -h "(d) [0-9]" "$O/vggt_1024.log"
timeout 80 lite3r bench vggt --views 1024 $B --kept-fp8 --json "$O/vggt_1024_fp8.json" > "$O/vggt_1024_fp8.log" 2>&1
step "bench vggt (d) 1024 views, kept layers FP8" $?
grep -h "(d) [0-9]" "$O/vggt_1024_fp8.log"
timeout 50 lite3r bench vggt --views 512 $B --kept-fp8 --json "$O/vggt_512_fp8.json" > "$O/vggt_512_fp8.log" 2>&1
step "bench vggt (d) 512 views, kept layers FP8" $?
grep -h "(d) [0-9]" "$O/vggt_512_fp8.log"
for f in "$O"/*.log; do grep -h -i -m3 "error\|Traceback\|out of memory" "$f" | sed "s|^|$(basename $f): |"; done
