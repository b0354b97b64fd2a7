#!/bin/bash
# Session 11: the GPU study of issue 16 and a long vggt-tiny run, over three calls (PHASE a, b, c):
#   a: pretrain the vggt-small teacher (16 views x 252x252 = 5,264 global tokens, 83 key blocks) alone for ~MINUTES,
#      finalise at the step reached; its fp16 weights come back in 15 MiB parts (49 MB: too big for one file).
#   b: `lite3r study vggt-small` on 32 held-out scenes x 16 views with those weights (carried in .cache/s11/small),
#      beside the start of a long vggt-tiny run (full loss + tracking, 4 views, 6000-step cosine).
#   c: the vggt-tiny run resumed from its checkpoint (carried in .cache/s11/tiny), finalised at the step reached.
# The tiny run's checkpoint comes back at the end of b and c (two 15 MiB parts) so the next call can resume it.
source "$(dirname "$0")/common.sh" s11$1
M=${MINUTES:-7.5}
T=$(python3 -c "print(int($M * 60))")
evals() { python3 - $1 <<'PY'
import json, os, sys
run = sys.argv[1]
try:
    if os.path.exists(f"{run}/metrics.json"):
        m = json.load(open(f"{run}/metrics.json"))
    else:  # mid-run: the evals so far live in the latest checkpoint's JSON
        name = json.load(open(f"{run}/checkpoints/latest.json"))["name"]
        m = json.load(open(f"{run}/checkpoints/{name}.json"))
    for e in m.get("evals", []):
        print("eval", {k: round(v, 3) if isinstance(v, float) else v for k, v in e.items()})
    if "metrics" in m:
        print("final", {k: round(v, 4) for k, v in m["metrics"]["trained"].items() if isinstance(v, float)})
except Exception as e:
    print("no metrics", e)
PY
}
tiny() {  # $1: fresh | resume
  if [ "$1" = fresh ]; then
    A="--size tiny --steps 6000 --batch 48 --views 4 --res 126,168 --lr 0.001 --warmup 100 --weight-decay 0.05
       --w-camera 5 --w-depth 1 --w-point 1 --w-track 0.2 --seed 0"
  else
    mkdir -p runs && cat .cache/s11/tiny/ckpt.tar.part* | tar -xf - && A="--resume"
  fi
  timeout -s TERM $T lite3r pretrain vggt $A --ckpt-every 200 --eval-every 200 --out runs/t11 --quiet \
    >> "$O/t11.log" 2>&1
  step "tiny $1" $?
}
case $1 in
a)
  timeout -s TERM $T lite3r pretrain vggt --size small --steps ${STEPS:-1200} --batch 4 --views 16 --res 252,252 \
    --lr 0.001 --warmup 60 --weight-decay 0.05 --w-camera 5 --w-depth 1 --w-point 1 --seed 0 --ckpt-every 100 \
    --eval-every 200 --eval-scenes 32 --out runs/s11 --quiet > "$O/s11.log" 2>&1
  step "pretrain vggt-small" $?
  [ -f runs/s11/teacher.safetensors ] || finalise runs/s11 "$O/s11.log"
  evals runs/s11; tail -5 "$O/s11.log"
  cp runs/s11/teacher.json runs/s11/metrics.json runs/s11/*.png "$O/" 2>/dev/null
  tar -cf - runs/s11/teacher.safetensors runs/s11/teacher.json | split -b 15M - "$OUT/small.tar.part"
  ;;
b)
  mkdir -p runs && cat .cache/s11/small/small.tar.part* | tar -xf -
  tiny fresh &
  timeout $((T - 20)) lite3r study vggt-small --weights runs/s11/teacher.safetensors --views 16 --size 252 \
    --scenes 32 --train-steps ${TSTEPS:-200} --train-batch 4 --out runs/study-small --quiet > "$O/study.log" 2>&1
  step "study vggt-small" $?
  cat "$O/study.log" | tail -30
  cp runs/study-small/study.json runs/study-small/study.png "$O/" 2>/dev/null
  for r in runs/study-small/*/; do cp $r/metrics.json "$O/$(basename $r)-metrics.json" 2>/dev/null; done
  wait; ckpt_back runs/t11 ckpt runs/t11/metrics.json; evals runs/t11
  ;;
c)
  tiny resume
  finalise runs/t11 "$O/t11.log"; evals runs/t11
  cp runs/t11/teacher.safetensors runs/t11/teacher.json runs/t11/metrics.json runs/t11/*.png "$O/" 2>/dev/null
  ;;
esac
step "all" 0
tar -cf "$OUT/s11$1.tar" -C "$OUT" s11$1 && rm -rf "$O"
ls -la "$OUT"
