"""Fused Sparse-Linear Attention (SLA) as Triton kernels behind torch.library ops, one module per op:

    block_map.py   pooling, block scores, exact top-K select; op lite3r::sla_block_map     -> sla_block_map
    linear.py      linear state phi(k)^T v, sum phi(k) (+ backward); lite3r::sla_linear_state -> linear_state
    attention.py   fused sparse + linear forward / backward; lite3r::sla_fwd, sla_bwd      -> sla_branches
                   inference with proj_l folded in, one output; lite3r::sla_fwd_sum        -> sla_output
    common.py      feature maps, the MMA helper, tiles and input checks they share

    lut = sla_block_map(q, k, topk=0.05, block_q=64, block_k=64)          # int32 [B, H, Mq, K]
    o_s, o_l = sla_branches(q, k, v, topk=0.05, block_q=64, block_k=64, feature_map="softmax")

Module switches and launch constants live in the module that reads them at call time (USE_TMA and OVERLAP in
attention.py): set them there, e.g. `lite3r_kernels.sla.attention.USE_TMA = False`. Reading one of them from this
package raises AttributeError naming its module, so a flip here can never silently do nothing. Tuning history
(timings, register counts, what was tried): docs/benchmarks.md, "Kernel tuning history".
"""
from .attention import _sla_fwd_kernel, sla_branches, sla_output, transpose_lut
from .block_map import (_normal_quantile, _select_kernel, _select_launch, block_scores, num_kept, score_tile,
                        select_top, sla_block_map, tiled_block_map)
from .common import FEATURE_MAPS, LINEAR_EPS, LOG2E
from .linear import linear_state, linear_state_torch

# name -> the module that reads it at call time (a copy here would not switch anything)
_LIVES_IN = {"USE_TMA": "attention", "OVERLAP": "attention", "_tma_descriptors": "attention",
             "_FWD_MAX_OFFSET": "attention", "_LINEAR_CHUNK": "attention", "_LINEAR_STATE_CHUNK": "linear",
             "_LINEAR_TILE": "linear", "_SELECT_MAX_TILE": "block_map", "_SELECT_CHUNK": "block_map",
             "_SCORE_BUDGET": "block_map"}


def __getattr__(name: str):
    if name in _LIVES_IN:
        raise AttributeError(f"lite3r_kernels.sla.{name} lives in lite3r_kernels.sla.{_LIVES_IN[name]} (read there at "
                             f"call time): get or set it there")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["sla_block_map", "sla_branches", "sla_output", "block_scores", "select_top", "num_kept", "score_tile",
           "tiled_block_map", "transpose_lut", "linear_state", "linear_state_torch", "LINEAR_EPS", "FEATURE_MAPS", "LOG2E"]
