"""Triton kernels for lite3r, registered as torch.library ops (`torch.ops.lite3r.*`) so torch.compile sees them.

    kernels.AVAILABLE                     triton importable (False: the functions below raise RuntimeError)
    kernels.supports(t)                   CUDA tensor, or CPU tensor while TRITON_INTERPRET=1
    kernels.sla_block_map(q, k, *, topk, block_q, block_k) -> lut int32 [B, H, Mq, K]
    kernels.sla_branches(q, k, v, *, topk, block_q, block_k, feature_map, lut=None) -> (o_s, o_l)  differentiable
    kernels.sla_output(q, k, v, *, topk, ..., weight, bias=None) -> o_s + proj_l(o_l)       inference, one buffer
    kernels.fp8_quantize(x, *, axis) -> (x_fp8, scale)
    kernels.fp8_fake_quant(x, *, axis) -> x_dq                                                     STE gradient
    kernels.layer_norm_fp8(x, weight, bias, *, eps, ln_dtype) -> (x_fp8 [M, C], scale [M, 1])   LayerNorm + quantise
    kernels.gelu_fp8(x) -> (x_fp8 [M, C], scale [M, 1])                                        GELU + quantise

Same definitions as the PyTorch references in lite3r.py (sla_block_map, sla_reference, fp8_quantize), which the
tests compare against. This package imports without triton and without CUDA.
"""
import os

import torch

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    AVAILABLE: bool = True
except Exception:  # ImportError, or a broken triton install
    AVAILABLE = False


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1, read at triton import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def supports(t: torch.Tensor) -> bool:
    """Whether the kernels can run on tensors like `t`: a CUDA tensor, or a CPU tensor under the interpreter."""
    if not AVAILABLE:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and interpreting()


if AVAILABLE:
    from .fp8 import fp8_fake_quant, fp8_quantize  # noqa: E402  (registers torch.ops.lite3r.fp8_*)
    from .fp8_fused import gelu_fp8, layer_norm_fp8  # noqa: E402  (torch.ops.lite3r.{layer_norm,gelu}_fp8_rows)
    from .sla import sla_block_map, sla_branches, sla_output  # noqa: E402  (registers torch.ops.lite3r.sla_*)
else:
    def _unavailable(*args, **kwargs):
        raise RuntimeError("kernels need triton (pip install triton); use lite3r's PyTorch reference instead")

    sla_block_map = sla_branches = sla_output = fp8_quantize = fp8_fake_quant = layer_norm_fp8 = gelu_fp8 = _unavailable

__all__ = ["AVAILABLE", "supports", "interpreting", "sla_block_map", "sla_branches", "sla_output", "fp8_quantize",
           "fp8_fake_quant", "layer_norm_fp8", "gelu_fp8"]
