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
