"""One GPU session for the kernels: correctness at real size + compile (pytest), then every timing as a table.

    python benchmarks/gpu_kernels.py [--skip-tests] [--views 8 32 128] [--configs] [--no-fp8] [--json $OUT/kernels.json]

Writes the rows of kernels.bench.run as JSON (when --json) and prints a compact table; numbers go to
docs/benchmarks.md."""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--views", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--topk", type=float, default=0.05)
    ap.add_argument("--json", default=None)
    ap.add_argument("--configs", action="store_true", help="also time the fused forward at every autotune config")
    ap.add_argument("--no-fp8", action="store_true", help="skip the FP8 cast rows")
    ap.add_argument("--tests", nargs="*", default=["tests/test_kernels.py", "tests/test_kernels_fp8.py"])
    args = ap.parse_args()
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    if not args.skip_tests:
        t = time.time()
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              *args.tests, "--durations=6"])
        print(f"tests rc={rc} in {time.time() - t:.0f}s", flush=True)
    from lite3r_kernels import bench

    t = time.time()
    rows = bench.run(views=tuple(args.views), topk=args.topk, configs=args.configs,
                     fp8_widths=() if args.no_fp8 else (1024, 4096))
    print(bench.format_rows(rows))
    from lite3r_kernels import sla

    for key, config in sla._sla_fwd_kernel.cache.items():  # what the forward's autotuner chose, per shape key
        print("fused forward config", key, config)
    print(f"bench in {time.time() - t:.0f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
