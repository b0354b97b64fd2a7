#!/bin/bash
# Next: continue the shipped vggt-tiny (session 11: AUC@30 0.36 at step 2005, lr 7.9e-4 left on its cosine) toward
# the AUC@30 >= 0.5 target: the same recipe from its weights (--init shipped), new scenes (--seed 1), a short warm-up
# to the lr it was cut at and a cosine over STEPS. Stopped by SIGTERM after MINUTES and finalised at the step reached;
# the checkpoint comes back in 15 MiB parts (resume with `--resume` from .cache/s12/ckpt.tar.part*).
source "$(dirname "$0")/common.sh" s12
M=${MINUTES:-8}
if ls .cache/s12/ckpt.tar.part* >/dev/null 2>&1; then
  mkdir -p runs && cat .cache/s12/ckpt.tar.part* | tar -xf - && A="--resume"
else
  A="--init shipped --seed ${SEED:-1} --size tiny --steps ${STEPS:-4000} --batch 48 --views 4 --res 126,168
     --lr ${LR:-0.0008} --warmup ${WARMUP:-50} --weight-decay 0.05 --w-camera 5 --w-depth 1 --w-point 1 --w-track 0.2"
fi
timeout -s TERM $(python3 -c "print(int($M * 60))") lite3r pretrain vggt $A --ckpt-every 200 --eval-every 200 \
  --out runs/t12 --quiet > "$O/t12.log" 2>&1
step "tiny continued" $?
if [ ! -f runs/t12/teacher.safetensors ]; then  # stopped by the time limit: checkpoint back, then finalise
  ckpt_back runs/t12 ckpt
  finalise runs/t12 "$O/t12.log"
fi
cp runs/t12/teacher.safetensors runs/t12/teacher.json runs/t12/metrics.json runs/t12/*.png "$O/" 2>/dev/null
tail -15 "$O/t12.log"
tar -cf "$OUT/s12.tar" -C "$OUT" s12 && rm -rf "$O"
ls -la "$OUT"
