#!/bin/bash
# Build (here, not on the device: it has no registry) a wheel of the public thu-ml SLA kernel into .whl/, for
# benchmarks/gpu/vs_thuml.py (issue 17: the fused forward >= 1.3x theirs). Its code is not part of lite3r: the wheel
# is built from a snapshot the `fetch` tool brings (github:thu-ml/SLA) and only travels with a GPU call.
#   bash benchmarks/gpu/thuml_wheel.sh /work/.mirror/thu-ml+SLA/repo
set -euo pipefail
GIT_DIR=${1:?the git directory of a thu-ml/SLA snapshot}
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
git --git-dir="$GIT_DIR" archive HEAD setup.py LICENSE.txt README.md sparse_linear_attention | tar -x -C "$tmp"  # (snapshots lack the big assets)
python3 -m pip wheel -q --no-deps --no-build-isolation --ignore-requires-python "$tmp" -w .whl  # (pure Python)
rm -rf "$tmp"
ls .whl
