# Sourced by the session scripts: install lite3r (and the carried wheels) without touching the machine's torch,
# results under $OUT/$1, `step NAME RC` prints a step's exit code and the time so far, `summ` the bench JSONs.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python3 -m pip install -q --no-deps --no-build-isolation .whl/*.whl >/dev/null 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
export LITE3R_TYPECHECK=0
O="$OUT/$1"
mkdir -p "$O"
t0=$(date +%s)
step() { echo "== $1 (rc $2, $(( $(date +%s) - t0 )) s so far)"; }
summ() { python3 benchmarks/gpu/bench_summary.py "$@"; }
# `finalise RUN LOG`: a SIGTERM'd `lite3r pretrain` run finalised at the step of its last checkpoint (teacher + metrics)
finalise() {
  if [ -f $1/checkpoints/latest.json ]; then
    local S F
    S=$(python3 -c "import json;print(json.load(open('$1/checkpoints/latest.json'))['step'])")
    F=$(python3 -c "import json;print(json.load(open('$1/config.json'))['family'])")
    timeout 120 lite3r pretrain $F --out $1 --resume --steps $S --quiet >> "$2" 2>&1
    step "$1 finalised at step $S" $?
  else
    step "$1: no checkpoint to finalise" 1; tail -20 "$2"
  fi
}
# `ckpt_back RUN NAME [FILE ...]`: the run's latest checkpoint (what --resume needs) and FILEs into $OUT as 15 MiB
# parts NAME.tar.part*, for the next call to carry back (one file may be at most 16 MiB)
ckpt_back() {
  local run=$1 name=$2 L
  shift 2
  L=$(python3 -c "import json;print(json.load(open('$run/checkpoints/latest.json'))['name'])") && \
  tar -cf - $run/config.json $run/checkpoints/latest.json $run/checkpoints/$L.* "$@" 2>/dev/null | \
    split -b 15M - "$OUT/$name.tar.part"
}
# `small_teacher SECONDS`: the vggt-small teacher of the GPU study (docs/quality.md) by its recipe into runs/s11
# (finalised at the step reached when cut), its record into $O, its fp16 weights into $OUT as 15 MiB parts
# small.tar.part* (49 MB: not shipped; the next call carries them back from .cache/s13a/)
small_teacher() {
  timeout -s TERM $1 lite3r pretrain vggt --size small --steps 1200 --batch 4 --views 16 --res 252,252 \
    --lr 0.001 --warmup 60 --weight-decay 0.05 --w-camera 5 --w-depth 1 --w-point 1 --seed 0 --ckpt-every 100 \
    --eval-every 200 --eval-scenes 32 --out runs/s11 --quiet > "$O/s11.log" 2>&1
  step "pretrain vggt-small" $?
  [ -f runs/s11/teacher.safetensors ] || finalise runs/s11 "$O/s11.log"
  cp runs/s11/teacher.json runs/s11/metrics.json runs/s11/*.png "$O/" 2>/dev/null
  tar -cf - runs/s11/teacher.safetensors runs/s11/teacher.json | split -b 15M - "$OUT/small.tar.part"
}
# `small_qat RUN SECONDS END [lite3r train options]`: a QAT run (SLA 0.05 + FP8, 16 views x 252) of that teacher
# (here, or carried in .cache/s13a/small.tar.part*) for at most SECONDS, then the study's dense / 0.05 / qat rows
# with it on 32 held-out scenes, in what is left until END seconds into the call; results into $O
small_qat() {
  local run=$1 secs=$2 end=$3 left
  shift 3
  [ -f runs/s11/teacher.safetensors ] || { mkdir -p runs && cat .cache/s13a/small.tar.part* | tar -xf -; }
  timeout -s TERM $secs lite3r train vggt-small --teacher runs/s11/teacher.safetensors --steps ${TSTEPS:-400} \
    --batch 4 --views 16 --res 252,252 --topk 0.05 --block 64 --fp8 --target ${TARGET:-gt} --lr 3e-3 --eval-scenes 0 \
    --seed ${SEED:-0} "$@" --out $run --quiet > "$O/qat.log" 2>&1
  step "qat vggt-small $*" $?
  cp $run/metrics.json "$O/qat-metrics.json" 2>/dev/null; cp $run/*.png "$O/" 2>/dev/null
  left=$(( end - ($(date +%s) - t0) ))
  timeout $left lite3r study vggt-small --weights runs/s11/teacher.safetensors --views 16 --size 252 --scenes 32 \
    --topk 0.05 --student $run --no-ablations --out $run-study --overwrite > "$O/study.log" 2>&1
  step "study vggt-small, qat row ($left s allowed)" $?
  tail -12 "$O/study.log"
  cp $run-study/study.json $run-study/study.png $run-study/study.partial.json "$O/" 2>/dev/null
}
