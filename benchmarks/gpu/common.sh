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
