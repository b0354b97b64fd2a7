#!/bin/bash
# Session 7, device call 1: teacher recipes side by side on one H200 (one process each), cut at T seconds
# (SIGINT: the run checkpoints), then finalised at the step reached (fp16 teacher + held-out metrics + plots).
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-deps --no-build-isolation .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
T=${T:-440}
mkdir -p "$OUT/q" runs
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
COMMON="--warmup 100 --weight-decay 0.05 --seed 0 --ckpt-every 50 --eval-every 100 --quiet"
launch() { name=$1; shift; ( timeout -s INT $T lite3r pretrain "$@" $COMMON --out runs/$name > "$OUT/q/$name.log" 2>&1; echo "rc $?" >> "$OUT/q/$name.log" ) & }
launch vggt-tiny-compass vggt --size tiny --steps 1400 --batch 48 --lr 0.001 --w-camera 5 --w-depth 1 --w-point 1 --fov-init 1.0
launch vggt-tiny-plain   vggt --size tiny --steps 1400 --batch 48 --lr 0.001 --w-camera 5 --w-depth 1 --w-point 1 --fov-init 1.0 --sky plain
launch vggt-tiny-b96     vggt --size tiny --steps 1400 --batch 96 --lr 0.001 --w-camera 5 --w-depth 1 --w-point 1 --fov-init 1.0
launch da3-tiny-compass  da3  --size tiny --steps 1400 --batch 48 --lr 0.0005 --w-camera 5 --w-depth 1 --w-point 0
launch vggt-small        vggt --size small --views 16 --steps 4000 --batch 4 --lr 0.0005 --w-camera 5 --w-depth 1 --w-point 1 --fov-init 1.0
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
wait
# finalise each run at the step it reached: 0 steps left -> fp16 teacher, held-out metrics, plots
for name in vggt-tiny-compass vggt-tiny-plain vggt-tiny-b96 da3-tiny-compass; do
  step=$(python3 -c "import json;print(json.load(open('runs/$name/checkpoints/latest.json'))['step'])")
  fam=${name%%-*}
  ( timeout 100 lite3r pretrain $fam --size tiny --out runs/$name --resume --steps $step --eval-scenes 16 --quiet \
      >> "$OUT/q/$name.log" 2>&1; echo "final rc $? step $step" >> "$OUT/q/$name.log"
    
    for f in teacher.safetensors metrics.json teacher.json loss.png heldout.png; do
      [ -f runs/$name/$f ] && cp runs/$name/$f "$OUT/q/$name.$f"; done ) &
done
wait
python3 - <<'PY'
import json
c = json.load(open("runs/vggt-small/checkpoints/latest.json"))
info = json.load(open(f"runs/vggt-small/checkpoints/{c['name']}.json"))
print("vggt-small at step", c["step"], "evals", [(e["step"], round(e.get("auc30", -1), 3), round(e.get("abs_rel", -1), 3)) for e in info["evals"]])
print("   last losses", info["history"][-1])
PY
python3 - <<'PY'
import json, glob, os
for f in sorted(glob.glob(os.environ["OUT"] + "/q/*.metrics.json")):
    m = json.load(open(f)); t = m["metrics"]["trained"]
    print(os.path.basename(f), "steps", m["config"]["steps"], {k: round(t[k], 4) for k in ("abs_rel", "auc30", "auc5", "rra5", "rta5", "chamfer") if k in t})
    print("   evals", [(e["step"], round(e.get("auc30", -1), 3), round(e.get("abs_rel", -1), 3)) for e in m["evals"]])
PY
grep -h "rc" "$OUT"/q/*.log
