#!/bin/bash
# Session 13, two calls (PHASE a, b):
#   a (issue 16): the vggt-small teacher remade from its session-11 recipe (its weights did not survive: 49 MB, not
#      shipped), its fp16 weights back as 15 MiB parts at once, then the GPU study on it with a 4x longer QAT
#      (400 steps x 4 scenes; session 11's 100 recovered 46 %) and untrained rows at counts of kept key blocks.
#      (The study's 15 untrained rows took the call's last 250 s: they came back in study.partial.json, the QAT not.)
#   c (issue 16): the QAT of a alone, as `lite3r train` (400 steps x 4 scenes, what the study's qat row runs), on
#      the teacher carried back in .cache/s13a/small.tar.part*, then the study's dense / 0.05 / qat rows with it.
#   d (issues 17, 16): after b measured the in-place stream (DA3 (d) 6.79 GiB at 128 views: the peak is one
#      65,536-token chunk's q/k/v projection, RoPE and bias temporaries), those temporaries trimmed (RoPE and the
#      bias in place at inference) and `--chunk-tokens` (smaller chunks): DA3 32 / 128 (a) vs (d) at 16,384, what is
#      alive at its peak, VGGT-1B (d) at 1024 views; then c's QAT again with the SLA layers' own weights trained too
#      (`--trainable attention`, new scenes every sample) and its study row.
#   b (issue 17): the in-place residual stream and half-at-a-time kept layers of session 12 (CPU-verified), measured:
#      DA3-Large at 32 / 128 views (a) vs (d) (target >= 2.5x / >= 3x less memory than (a)), what is alive at DA3's
#      peak at 128 views, and VGGT-1B (d) at 1024 views (was 38.78 GiB / 24.23 s).
source "$(dirname "$0")/common.sh" s13$1
case $1 in
a)
  small_teacher 330
  tail -5 "$O/s11.log"
  left=$(( 575 - ($(date +%s) - t0) ))
  timeout $left lite3r study vggt-small --weights runs/s11/teacher.safetensors --views 16 --size 252 \
    --scenes 32 --train-steps ${TSTEPS:-400} --train-batch 4 --no-ablations --kept-blocks 2,4,8,16 \
    --out runs/study-small --overwrite > "$O/study.log" 2>&1
  step "study vggt-small ($left s allowed)" $?
  tail -30 "$O/study.log"
  cp runs/study-small/study.json runs/study-small/study.png runs/study-small/study.partial.json "$O/" 2>/dev/null
  cp runs/study-small/qat/metrics.json "$O/qat-metrics.json" 2>/dev/null
  cp runs/study-small/qat/loss.png "$O/qat-loss.png" 2>/dev/null
  ;;
c)
  small_qat runs/qat-small 330 570 --ckpt-every 100
  ;;
d)
  timeout 120 lite3r bench da3 --views 32,128 --variants a,d --kept-blocks 64 --warmup 1 --repeats 1 \
    --compile-mode none --kept-fp8 --head-frames 2 --chunk-tokens 16384 --json "$O/da3.json" > "$O/da3.log" 2>&1
  step "bench da3, chunks of 16384" $?; tail -12 "$O/da3.log"
  timeout 90 python3 benchmarks/gpu/memory_peak.py da3 --views 128 --variant d --kept-blocks 64 --kept-fp8 \
    --head-frames 2 --chunk-tokens 16384 --json "$O/da3-peak.json" > "$O/da3-peak.log" 2>&1
  step "memory_peak da3 128" $?; head -14 "$O/da3-peak.log"
  timeout 150 lite3r bench vggt --views 1024 --variants d --kept-blocks 64 --warmup 1 --repeats 1 \
    --compile-mode none --kept-fp8 --json "$O/vggt1024.json" > "$O/vggt1024.log" 2>&1
  step "bench vggt 1024" $?; tail -6 "$O/vggt1024.log"
  TSTEPS=${TSTEPS:-300} small_qat runs/qat-attn 260 560 --trainable attention --lr-inherited 1e-4 --scenes 0 \
    --ckpt-every 50
  ;;
b)
  timeout 200 lite3r bench da3 --views 32,128 --variants a,d --kept-blocks 64 --warmup 1 --repeats 1 \
    --compile-mode none --kept-fp8 --head-frames 2 --json "$O/da3.json" > "$O/da3.log" 2>&1
  step "bench da3" $?; tail -12 "$O/da3.log"
  timeout 120 python3 benchmarks/gpu/memory_peak.py da3 --views 128 --variant d --kept-blocks 64 --kept-fp8 \
    --head-frames 2 --json "$O/da3-peak.json" > "$O/da3-peak.log" 2>&1
  step "memory_peak da3 128" $?; head -25 "$O/da3-peak.log"
  timeout 200 lite3r bench vggt --views 1024 --variants d --kept-blocks 64 --warmup 1 --repeats 1 \
    --compile-mode none --kept-fp8 --json "$O/vggt1024.json" > "$O/vggt1024.log" 2>&1
  step "bench vggt 1024" $?; tail -8 "$O/vggt1024.log"
  ;;
esac
tar -cf "$OUT/s13$1.tar" -C "$OUT" s13$1 && rm -rf "$O"
ls -la "$OUT"
