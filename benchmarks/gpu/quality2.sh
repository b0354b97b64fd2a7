#!/bin/bash
# Session 7 device call: teacher recipes side by side on one H200 (one process each, 4 CPU threads each), stopped
# with SIGTERM at T seconds (the run checkpoints) and finalised at the step reached (fp16 teacher, held-out metrics).
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-deps --no-build-isolation .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
T=${T:-330}
export OMP_NUM_THREADS=4
mkdir -p "$OUT/q" runs
COMMON="--warmup 60 --weight-decay 0.05 --seed 0 --ckpt-every 100 --eval-every 100 --quiet"
launch() { name=$1; shift; ( timeout -s TERM $T lite3r pretrain "$@" $COMMON --out runs/$name > "$OUT/q/$name.log" 2>&1; echo "rc $?" >> "$OUT/q/$name.log" ) & }
launch vggt-tiny-compass vggt --size tiny --steps 700 --batch 48 --lr 0.001 --w-camera 5 --w-depth 1 --w-point 1 --fov-init 1.0
launch vggt-tiny-plain   vggt --size tiny --steps 700 --batch 48 --lr 0.001 --w-camera 5 --w-depth 1 --w-point 1 --fov-init 1.0 --sky plain
launch da3-tiny-compass  da3  --size tiny --steps 700 --batch 48 --lr 0.0005 --w-camera 5 --w-depth 1 --w-point 0
launch vggt-small        vggt --size small --views 16 --steps 3000 --batch 4 --lr 0.0005 --w-camera 5 --w-depth 1 --w-point 1 --fov-init 1.0
sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
wait
for name in vggt-tiny-compass vggt-tiny-plain da3-tiny-compass vggt-small; do
  [ -f runs/$name/teacher.safetensors ] && continue
  step=$(python3 -c "import json;print(json.load(open('runs/$name/checkpoints/latest.json'))['step'])")
  fam=${name%%-*}; size=tiny; [ $name = vggt-small ] && size=small
  ( timeout 120 lite3r pretrain $fam --size $size --out runs/$name --resume --steps $step --quiet \
      >> "$OUT/q/$name.log" 2>&1; echo "final rc $? step $step" >> "$OUT/q/$name.log" ) &
done
wait
for name in vggt-tiny-compass vggt-tiny-plain da3-tiny-compass vggt-small; do
  for f in metrics.json teacher.json loss.png heldout.png; do [ -f runs/$name/$f ] && cp runs/$name/$f "$OUT/q/$name.$f"; done
done
for name in vggt-tiny-compass vggt-tiny-plain da3-tiny-compass; do cp runs/$name/teacher.safetensors "$OUT/q/$name.teacher.safetensors"; done
split -b 15M runs/vggt-small/teacher.safetensors "$OUT/q/vggt-small.teacher.safetensors.part-"
python3 - <<'PY'
import json, glob, os
for f in sorted(glob.glob(os.environ["OUT"] + "/q/*.metrics.json")):
    m = json.load(open(f)); t = m["metrics"]["trained"]
    print(os.path.basename(f), "steps", m["config"]["steps"], "s", m.get("train_seconds"), {k: round(t[k], 4) for k in ("abs_rel", "delta1", "auc30", "auc5", "rra5", "rta5", "chamfer", "fscore") if k in t})
    print("   evals", [(e["step"], round(e.get("auc30", -1), 3), round(e.get("abs_rel", -1), 3)) for e in m["evals"]])
PY
grep -h "rc" "$OUT"/q/*.log
bash benchmarks/gpu/issue18.sh 2>&1 | tail -40
