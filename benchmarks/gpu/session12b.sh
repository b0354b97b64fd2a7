#!/bin/bash
# Session 12, b: the GPU study of issue 16 again on session 11's vggt-small teacher (carried in .cache/s11/small as
# 15 MiB parts), with a 4x longer QAT (400 steps x 4 scenes: session 11's 100 recovered 46 % of the swap's loss) and
# untrained rows at counts of kept key blocks (issue 17's count-based sparsity: 83 key blocks at 16 views x 252).
source "$(dirname "$0")/common.sh" s12b
mkdir -p runs && cat .cache/s11/small/small.tar.part* | tar -xf -
timeout ${SECONDS_STUDY:-500} lite3r study vggt-small --weights runs/s11/teacher.safetensors --views 16 --size 252 \
  --scenes 32 --train-steps ${TSTEPS:-400} --train-batch 4 --no-ablations --kept-blocks 2,4,8,16 \
  --out runs/study-small --overwrite > "$O/study.log" 2>&1
step "study vggt-small" $?
tail -30 "$O/study.log"
cp runs/study-small/study.json runs/study-small/study.png "$O/" 2>/dev/null
cp runs/study-small/qat/metrics.json "$O/qat-metrics.json" 2>/dev/null
cp runs/study-small/qat/loss.png "$O/qat-loss.png" 2>/dev/null
tar -cf "$OUT/s12b.tar" -C "$OUT" s12b && rm -rf "$O"
ls -la "$OUT"
