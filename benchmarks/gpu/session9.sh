#!/bin/bash
# Session 9, first call: does the tracking loss (exact tracks of view-0 pixels) let vggt-tiny's camera head leave the
# mean-pose plateau? In parallel on one H200 for ~8 min: the 2-view pose probe (camera + tracking loss, random
# content: on the CPU the camera loss alone never left the plateau in 2500 x 32) and a vggt-tiny teacher candidate
# (4 views, 126x168, full loss + tracking) by `lite3r pretrain`, stopped by SIGTERM and finalised (its run folder comes
# back split in 15 MiB parts for --resume). Also DA3-Large (a) / (d) peak memory at 128 views with the frame chunks.
source "$(dirname "$0")/common.sh" s9
M=${MINUTES:-7.5}
( timeout 60 lite3r bench da3 --views 128 --variants a,d --kept-blocks 64 --warmup 1 --repeats 1 --compile-mode none \
    --kept-fp8 --head-frames 2 --json "$O/da3_128_mem.json" > "$O/da3_128_mem.log" 2>&1; step "da3 128 memory" $? ) &
python3 benchmarks/quality/pose_probe.py --device cuda --views 2 --arc 90,200 --batch 32 --steps 4000 --wdepth 0 \
  --wpoint 0 --wtrack 0.2 --minutes $M > "$O/probe_track.log" 2>&1 &
timeout -s TERM $(python3 -c "print(int($M * 60 + 20))") lite3r pretrain vggt --size tiny --steps 3000 --batch 48 \
  --views 4 --res 126,168 --lr 0.001 --warmup 100 --weight-decay 0.05 --w-camera 5 --w-depth 1 --w-point 1 \
  --w-track 0.2 --seed 0 --ckpt-every 250 --eval-every 100 --out runs/t9 --quiet > "$O/pretrain.log" 2>&1
step "pretrain vggt-tiny + track" $?
wait
if [ -f runs/t9/checkpoints/latest.json ]; then  # finalise at the step reached
  S=$(python3 -c "import json;print(json.load(open('runs/t9/checkpoints/latest.json'))['step'])")
  timeout 90 lite3r pretrain vggt --out runs/t9 --resume --steps $S --quiet >> "$O/pretrain.log" 2>&1
  step "finalised at step $S" $?
else
  step "no checkpoint to finalise" 1; tail -20 "$O/pretrain.log"
fi
step "all" 0
summ "$O/da3_128_mem.json"
tail -3 "$O/pretrain.log"; grep -h "held corr\|time up" "$O/probe_track.log" | tail -40
python3 - runs/t9/metrics.json <<'PY'
import json, sys
try:
    m = json.load(open(sys.argv[1]))
    for e in m.get("evals", []):
        print("eval", {k: round(v, 3) if isinstance(v, float) else v for k, v in e.items()})
    print("final", {k: round(v, 4) for k, v in m["metrics"]["trained"].items() if isinstance(v, float)})
except Exception as e:
    print("no metrics", e)
PY
# back: the checkpoint (for --resume) in 15 MiB parts, everything else in one tar (at most 8 files come back)
L=$(python3 -c "import json;print(json.load(open('runs/t9/checkpoints/latest.json'))['name'])" 2>/dev/null) && \
tar -cf - runs/t9/config.json runs/t9/checkpoints/latest.json runs/t9/checkpoints/$L.* | split -b 15M - "$OUT/ckpt.tar.part"
cp runs/t9/teacher.safetensors runs/t9/teacher.json runs/t9/metrics.json runs/t9/*.png "$O/" 2>/dev/null
tar -cf "$OUT/s9.tar" -C "$OUT" s9 && rm -rf "$O"
ls -la "$OUT"
