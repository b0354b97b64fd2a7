"""The token-chunked inference of a deployed student against the same model run whole, on the GPU.

    python benchmarks/gpu/chunk_parity.py vggt --views 48

(d) at 48 views x 518 (65,952 tokens: two 64k-token chunks, frame blocks in chunks of 47 frames), eager, random
weights, K = 64: outputs with the deploy defaults (mlp_chunk_tokens 65536, heads 2 frames at a time) vs
mlp_chunk_tokens None and heads 8 frames at a time; relative error of each output, and both peaks.
"""
import argparse
import dataclasses

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", choices=["vggt", "da3"])
    ap.add_argument("--views", type=int, default=48)
    a = ap.parse_args()
    from lite3r_cli.bench import BenchConfig, build_variant, resolve_backbone_for
    from lite3r_recon import models

    device = torch.device("cuda")
    cfg = BenchConfig(model=a.model, views=(a.views,), res=518, kept_blocks=64, variants=("d",), compile_mode=None)
    model = build_variant("d", resolve_backbone_for(a.model, device), cfg, device)
    images = torch.rand(1, a.views, 3, 518, 518, generator=torch.Generator().manual_seed(0)).to(device)
    chunked = model.config
    outs, peaks = [], []
    for config in (chunked, dataclasses.replace(chunked, mlp_chunk_tokens=None, frames_chunk_size=8)):
        model.config = config
        torch.cuda.reset_peak_memory_stats()
        out = models.infer(model, images)
        peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        outs.append({k: v.float() for k, v in out.items() if isinstance(v, torch.Tensor) and k != "images"})
        del out
    print(f"{a.model} x{a.views} (d): chunked (tokens {chunked.mlp_chunk_tokens}, heads {chunked.frames_chunk_size} "
          f"frames) peak {peaks[0]:.2f} GiB vs whole peak {peaks[1]:.2f} GiB")
    for k, ref in outs[1].items():
        err = float((outs[0][k] - ref).norm() / ref.norm().clamp_min(1e-30))
        print(f"  {k:20s} rel. error chunked vs whole {err:.2e}")


if __name__ == "__main__":
    main()
