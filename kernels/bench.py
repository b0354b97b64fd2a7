"""Kernel benchmarks: SLA (block map + both branches) vs dense SDPA, and the FP8 quantise-cast kernels.

    rows = kernels.bench.run(views=(8, 32, 128), topk=0.05)   # list of dicts; prints nothing

Shapes follow VGGT's global attention: B=1, H=16, D=64, N = views x 1374 tokens, bf16. Each row: name, shape, ms,
tflops (None where it means nothing), speedup (vs the SDPA row of the same shape and pass, else None), extra
fields (gbps for FP8, density for SLA). CUDA only (timings through triton.testing.do_bench); on CPU it raises.
"""
import contextlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F

TOKENS_PER_VIEW = 1374  # VGGT at 518 x 518: 37 x 37 patches + 5 special tokens


def _time(fn: Callable[[], object], rep_ms: int, graph: bool = False) -> float:
    """Median ms per call; graph=True replays a CUDA graph of the call (GPU time without Python launch overhead)."""
    import triton.testing

    if graph:
        fn()  # compile / autotune outside the capture
        with torch.cuda.stream(torch.cuda.Stream()):
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms))
    return float(triton.testing.do_bench(fn, warmup=max(25, rep_ms // 4), rep=rep_ms))


def _row(name: str, shape: str, ms: float, flop: Optional[float] = None, ref_ms: Optional[float] = None,
         **extra) -> dict:
    return {"name": name, "shape": shape, "ms": round(ms, 4),
            "tflops": None if flop is None else round(flop / ms / 1e9, 1),
            "speedup": None if ref_ms is None else round(ref_ms / ms, 2), **extra}


@contextlib.contextmanager
def _switched(module, name: str, value):
    """module.name = value inside the block, restored after (the kernels' USE_TMA / OVERLAP switches)."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def sla_rows(views: int, *, topk: float = 0.05, heads: int = 16, head_dim: int = 64, block: int = 64,
             dtype: torch.dtype = torch.bfloat16, backward: bool = True, configs: bool = False,
             rep_ms: int = 200) -> list[dict]:
    """SDPA vs SLA at N = views x 1374: forward (total and its parts; configs: the fused kernel at each candidate
    autotune config too) and forward + backward."""
    from . import sla
    from .sla import attention  # where the USE_TMA / OVERLAP switches live

    N = views * TOKENS_PER_VIEW
    shape = f"B=1 H={heads} N={N} D={head_dim} {str(dtype).removeprefix('torch.')}"
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, heads, N, head_dim, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    n_blocks = -(-N // block)
    kept = sla.num_kept(topk, n_blocks)
    dense_flop = 4.0 * heads * N * N * head_dim
    sparse_flop = 4.0 * heads * n_blocks * block * kept * block * head_dim  # computed (full) tiles
    rows = []
    sdpa_ms = _time(lambda: F.scaled_dot_product_attention(q, k, v), rep_ms)
    rows.append(_row("sdpa fwd", shape, sdpa_ms, dense_flop))

    def sla_fwd():
        return sla.sla_branches(q, k, v, topk=topk, block_q=block, block_k=block)

    rows.append(_row("sla fwd (block map + sparse + linear)", shape, _time(sla_fwd, rep_ms), sparse_flop, sdpa_ms,
                     density=round(kept / n_blocks, 4)))
    rows.append(_row("sla fwd, CUDA graph (no launch overhead)", shape, _time(sla_fwd, rep_ms, graph=True),
                     sparse_flop, sdpa_ms))
    with _switched(attention, "OVERLAP", False):  # the linear state on the main stream too
        rows.append(_row("- sla fwd, one stream (eager)", shape, _time(sla_fwd, rep_ms), sparse_flop, sdpa_ms))
    lut = sla.sla_block_map(q, k, topk=topk, block_q=block, block_k=block)
    rows.append(_row("sla block map", shape,
                     _time(lambda: sla.sla_block_map(q, k, topk=topk, block_q=block, block_k=block), rep_ms)))
    rows.append(_row("- block map: whole score tensor", shape,
                     _time(lambda: sla.select_top(sla.block_scores(q, k, block, block), kept), rep_ms)))
    rows.append(_row("- block map: tiled (score budget)", shape,
                     _time(lambda: sla.tiled_block_map(q, k, kept, block, block), rep_ms),
                     tile="{} heads x {} rows".format(*sla.score_tile(heads, n_blocks, n_blocks))))
    scores = sla.block_scores(q, k, block, block)
    rows.append(_row("- block map: pooling + scores (CUDA graph)", shape,
                     _time(lambda: sla.block_scores(q, k, block, block), rep_ms, graph=True)))
    rows.append(_row("- block map: select kernel (CUDA graph)", shape,
                     _time(lambda: sla.select_top(scores, kept), rep_ms, graph=True)))
    rows.append(_row("- block map: torch.topk instead (CUDA graph)", shape,
                     _time(lambda: scores.topk(kept, dim=-1, sorted=False).indices.to(torch.int32), rep_ms,
                           graph=True)))
    rows.append(_row("sla linear state phi(k)^T v", shape, _time(lambda: sla.linear_state(k, v, "softmax"), rep_ms)))
    kv, ksum = sla.linear_state(k, v, "softmax")
    rows.append(_row("sla fused kernel (sparse + linear)", shape,
                     _time(lambda: torch.ops.lite3r.sla_fwd(q, k, v, lut, kv, ksum, block, block, 0), rep_ms),
                     sparse_flop))
    if attention.USE_TMA and N % block == 0:  # the same kernel with pointer loads instead of TMA descriptors
        with _switched(attention, "USE_TMA", False):
            rows.append(_row("- fused kernel, pointer loads (no TMA)", shape,
                             _time(lambda: torch.ops.lite3r.sla_fwd(q, k, v, lut, kv, ksum, block, block, 0), rep_ms),
                             sparse_flop))
    if configs:
        rows += _fwd_config_rows(q, k, v, lut, kv, ksum, block, shape, sparse_flop, rep_ms)
    if backward:
        qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
        do = torch.randn_like(q)

        def sdpa_fb():
            F.scaled_dot_product_attention(qg, kg, vg).backward(do)

        def sla_fb():
            o_s, o_l = sla.sla_branches(qg, kg, vg, topk=topk, block_q=block, block_k=block)
            torch.autograd.backward((o_s, o_l), (do, do))

        ref = _time(sdpa_fb, rep_ms)
        rows.append(_row("sdpa fwd+bwd", shape, ref, 3.5 * dense_flop))
        rows.append(_row("sla fwd+bwd", shape, _time(sla_fb, rep_ms), 3.5 * sparse_flop, ref))
    return rows


def _fwd_config_rows(q, k, v, lut, kv, ksum, block, shape, flop, rep_ms) -> list[dict]:
    """The fused forward kernel timed at each (STEP, stages, register cap) at 4 warps: the autotuner's candidates
    and the STEP=1 ones it no longer has."""
    import triton

    from . import sla

    tuner = sla._sla_fwd_kernel
    saved = tuner.configs
    rows = []
    try:
        for step in (1, 2):
            for stages in (2, 3, 4):
                for maxnreg in (168, None):
                    tuner.configs = [triton.Config({"STEP": step}, num_warps=4, num_stages=stages, maxnreg=maxnreg)]
                    tuner.cache = {}
                    ms = _time(lambda: torch.ops.lite3r.sla_fwd(q, k, v, lut, kv, ksum, block, block, 0), rep_ms)
                    cap = "" if maxnreg is None else f", <= {maxnreg} registers"
                    rows.append(_row(f"- fused kernel at STEP={step} 4 warps {stages} stages{cap}", shape, ms, flop))
    finally:
        tuner.configs, tuner.cache = saved, {}
    return rows


def fp8_rows(tokens: int, width: int, *, dtype: torch.dtype = torch.bfloat16, rep_ms: int = 100) -> list[dict]:
    """Per-token FP8 quantise-cast of [tokens, width]: the kernel, the torch twin (eager), and a plain copy of the
    same bytes as the bandwidth yardstick. gbps counts bytes read + written."""
    from . import fp8

    x = torch.randn(tokens, width, device="cuda", dtype=dtype)
    shape = f"[{tokens}, {width}] {str(dtype).removeprefix('torch.')}"
    moved = x.numel() * (x.element_size() + 1) + tokens * 4
    copy_src = torch.empty(moved // 2, dtype=torch.uint8, device="cuda")
    copy_ms = _time(lambda: copy_src.clone(), rep_ms, graph=True)
    rows = [_row("copy (same bytes)", shape, copy_ms, gbps=round(moved / copy_ms / 1e6, 1))]
    for name, fn, graph in (("fp8 quantize (kernel, CUDA graph)", lambda: torch.ops.lite3r.fp8_quantize_rows(x), True),
                            ("fp8 quantize (kernels.fp8_quantize, eager)", lambda: fp8.fp8_quantize(x, axis=-1), False),
                            ("fp8 quantize (torch eager)", lambda: fp8.fp8_quantize_torch(x, axis=-1), False)):
        ms = _time(fn, rep_ms, graph=graph)
        rows.append(_row(name, shape, ms, ref_ms=copy_ms, gbps=round(moved / ms / 1e6, 1)))
    dq = x.numel() * x.element_size() * 2 + tokens * 4
    ms = _time(lambda: torch.ops.lite3r.fp8_fake_quant_rows(x), rep_ms, graph=True)
    rows.append(_row("fp8 fake quant (kernel, CUDA graph)", shape, ms, ref_ms=copy_ms, gbps=round(dq / ms / 1e6, 1)))
    return rows


def run(views=(8, 32, 128), topk: float = 0.05, *, heads: int = 16, head_dim: int = 64,
        dtype: torch.dtype = torch.bfloat16, backward_views=(8, 32), fp8_widths=(1024, 4096),
        configs: bool = False, rep_ms: int = 200) -> list[dict]:
    """All kernel benchmarks as rows (see module doc). Needs CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("kernel benchmarks need a CUDA GPU (timings on the CPU interpreter mean nothing)")
    rows = []
    for s in views:
        rows += sla_rows(s, topk=topk, heads=heads, head_dim=head_dim, dtype=dtype,
                         backward=s in backward_views, configs=configs, rep_ms=rep_ms)
    tokens = 32 * TOKENS_PER_VIEW
    for w in fp8_widths:
        rows += fp8_rows(tokens, w, dtype=dtype, rep_ms=max(50, rep_ms // 2))
    return rows


def format_rows(rows: list[dict]) -> str:
    """Plain-text table of `run`'s rows (for scripts and logs)."""
    keys = ["name", "shape", "ms", "tflops", "speedup", "gbps", "density"]
    keys = [k for k in keys if any(k in r for r in rows)]
    cells = [[str(r.get(k, "")) if r.get(k) is not None else "" for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(lines)
