"""lite3r: Sparse-Linear Attention (SLA) + FP8 QAT and deployment for ViT-style 3D reconstruction transformers.

One copyable file: torch + jaxtyping + beartype (+ the optional `kernels` package, used when it imports and
supports the tensors' device). Everything here has a pure-PyTorch path; the Triton kernels are tested against it.

    report = swap_attention(student, topk=0.05)       # SLA attention + FP8 fake-quant linears, only proj_l trains
    with AttentionRecorder(teacher) as t, AttentionRecorder(student) as s:
        teacher(x); student(x)
    loss = task + lambda_kd * distill_loss(s.outputs, t.outputs)
    model = deploy(student)                           # FP8 weights (+ W8A8 GEMMs on sm90+), fused SLA, compiled

Shapes: B batch, H heads, N tokens, D head dim, C = H * D model dim, Mq / Mk query / key blocks, K kept key blocks.
Env: LITE3R_BACKEND = auto | triton | torch (kernel dispatch), LITE3R_TYPECHECK = 0 turns the shape checks off.
"""
import dataclasses
import functools
import importlib
import inspect
import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from beartype import beartype
from jaxtyping import Float, Int32, Shaped, jaxtyped
from torch import Tensor, nn

__all__ = [
    "TYPECHECK", "typed", "FEATURE_MAPS", "LINEAR_EPS", "FP8_MAX", "sla_block_map", "sla_reference",
    "linear_attention_reference", "sla_attention", "fp8_quantize", "fp8_fake_quant", "distill_loss",
    "SLAAttention", "FP8FakeQuantLinear", "FP8Linear", "is_attention", "swap_attention", "SwapReport",
    "AttentionRecorder", "to_fp8_inference", "deploy", "Lite3rError", "SLAConfig", "swap_modules", "convert_to_sla",
    "convert_to_fp8_qat", "freeze_all_but_proj_l", "survey_attention", "AttentionEntry", "fuse_fp8_inputs",
    "FusedLayerNorm", "FusedGELU",
]

class Lite3rError(ValueError):
    """Input the core cannot use (a bad argument, shape or value); the message is one line naming it. The `lite3r`
    command prints that line; any other exception is a bug and keeps its traceback."""


# ------------------------------------------------------------------------------------------------ type checks
TYPECHECK: bool = os.environ.get("LITE3R_TYPECHECK", "1") != "0"


def typed(fn):
    """jaxtyping shapes checked by beartype, or `fn` itself when LITE3R_TYPECHECK=0. The checks are skipped while
    torch.compile traces (dynamo would graph-break or recompile on the checker's Python), so the compiled graph
    is the bare function."""
    if not TYPECHECK:
        return fn
    checked = jaxtyped(typechecker=beartype)(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        return checked(*args, **kwargs)

    return wrapper


# ------------------------------------------------------------------------------------------ kernels dispatch
_KERNELS: list = []  # [module or None] once the lazy import was tried
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_AUTO_DEVICES = ("cuda",)  # where LITE3R_BACKEND=auto uses the kernels; "triton" forces them anywhere they run


def _kernels():
    """The `kernels` package, or None when it (or triton) does not import. Imported on first use, never at import
    time, so `import lite3r` needs nothing but torch."""
    if not _KERNELS:
        try:
            _KERNELS.append(importlib.import_module("lite3r_kernels"))
        except Exception:  # ImportError, or a half-written package: fall back to the reference
            _KERNELS.append(None)
    return _KERNELS[0]


def _backend(t: Tensor, op: str):
    """The kernels module when `op` should run there for tensors like `t`, else None (the PyTorch reference)."""
    choice = os.environ.get("LITE3R_BACKEND", "auto").lower()
    if choice == "torch":
        return None
    if choice not in ("auto", "triton"):
        raise Lite3rError(f"LITE3R_BACKEND must be auto, triton or torch, got {choice!r}")
    if choice == "auto" and t.device.type not in _AUTO_DEVICES:  # the Triton interpreter is never picked by itself
        return None
    mod = _kernels()
    try:  # the kernels take fp32/fp16/bf16; fp64 (gradcheck) stays on the reference
        ok = (mod is not None and bool(mod.AVAILABLE) and hasattr(mod, op) and t.dtype in _KERNEL_DTYPES
              and bool(mod.supports(t)))
    except Exception:
        ok = False
    if choice == "triton" and not ok:
        raise RuntimeError(f"LITE3R_BACKEND=triton but kernels.{op} is unavailable for a {t.device.type} "
                           f"{t.dtype} tensor (triton missing, kernels not importable, or device/dtype unsupported)")
    return mod if ok else None


# -------------------------------------------------------------------------------------- sparse-linear attention
LINEAR_EPS = 1e-6  # added to the linear branch's denominator (relu features can be all zero)


def _phi_softmax(x: Tensor) -> Tensor:
    return x.softmax(dim=-1)


def _phi_elu(x: Tensor) -> Tensor:
    return F.elu(x) + 1.0


def _phi_relu(x: Tensor) -> Tensor:
    return F.relu(x)


FEATURE_MAPS: dict[str, Callable[[Tensor], Tensor]] = {"softmax": _phi_softmax, "elu": _phi_elu, "relu": _phi_relu}


def _num_kept(topk: float, n_blocks: int) -> int:
    """K = max(1, ceil(topk * Mk)) key blocks per query block (capped at Mk)."""
    _check_topk(topk, "topk")
    return min(n_blocks, max(1, math.ceil(topk * n_blocks)))


def _kept_fraction(kept_blocks: int, n_blocks: int) -> float:
    """The kept fraction whose K = ceil(fraction * Mk) (_num_kept, and the kernels) is exactly min(kept_blocks, Mk):
    (kept - 0.5) / Mk lies strictly inside ((kept - 1) / Mk, kept / Mk]; kept / Mk itself can round up to kept + 1."""
    return 1.0 if kept_blocks >= n_blocks else (kept_blocks - 0.5) / n_blocks


def _check_kept_blocks(value, name: str = "kept_blocks") -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise Lite3rError(f"{name} is a count of key blocks per query block, a positive int or None; got {value!r}")
    return value


def num_kept_blocks(n_tokens: int, *, topk: float, kept_blocks: int | None = None, block_k: int = 64) -> int:
    """K, the key blocks each query block keeps over n_tokens keys, as sla_attention and the kernels compute it:
    min(kept_blocks, Mk) when kept_blocks is set, else max(1, ceil(topk * Mk)) (Mk = ceil(n_tokens / block_k))."""
    n_k = -(-n_tokens // block_k)
    if _check_kept_blocks(kept_blocks) is not None:
        return _num_kept(_kept_fraction(kept_blocks, n_k), n_k)
    return _num_kept(float(topk), n_k)


def _block_mean(x: Tensor, block: int) -> Tensor:
    """[B,H,N,D] -> [B,H,ceil(N/block),D]: mean over each block's real tokens (the last block may be partial)."""
    N = x.shape[2]
    m = -(-N // block)
    x = F.pad(x, (0, 0, 0, m * block - N))
    sums = x.unflatten(2, (m, block)).sum(dim=3)
    counts = torch.full((m,), float(block), device=x.device, dtype=x.dtype)
    counts[-1] = N - (m - 1) * block
    return sums / counts[:, None]


@typed
def sla_block_map(q: Float[Tensor, "b h n d"], k: Float[Tensor, "b h n d"], *, topk: float | int,
                  block_q: int = 64, block_k: int = 64) -> Int32[Tensor, "b h mq kk"]:
    """The block map (LUT): for each query block, the indices of its K = max(1, ceil(topk * Mk)) kept key blocks.

    Score of (query block i, key block j) = mean-pooled q of block i . mean-pooled (k - mean_N k) of block j, in
    fp32. Centring does not change a row's ranking in exact arithmetic (it subtracts pooled_q_i . mean k from every
    score of row i); it keeps a large component shared by all keys out of the fp32 dot products, and it is the
    definition the kernels share. Indices come from torch.topk(sorted=False): consumers must not rely on their
    order. Returns int32 [B, H, Mq, K].
    """
    return _block_map(q, k, float(topk), block_q, block_k)


_SCORE_BUDGET = 128 << 20  # bytes of fp32 block scores _block_map holds at once ([Mq, Mk] per head is (N/64)^2)


def _score_tile(bh: int, n_q: int, n_k: int) -> tuple[int, int]:
    """(heads, query-block rows) scored at once: the most within _SCORE_BUDGET, whole heads first (>= 1 row)."""
    rows = max(1, _SCORE_BUDGET // (4 * n_k))
    return (min(bh, rows // n_q), n_q) if rows >= n_q else (1, rows)


def _block_map(q: Tensor, k: Tensor, topk: float, block_q: int, block_k: int) -> Tensor:
    if block_q < 1 or block_k < 1:
        raise Lite3rError(f"block sizes must be positive, got block_q={block_q}, block_k={block_k}")
    B, H = q.shape[:2]
    n_k = -(-k.shape[2] // block_k)
    kept = _num_kept(topk, n_k)
    qf, kf = q.detach().float(), k.detach().float()
    pooled_q = _block_mean(qf, block_q).flatten(0, 1)  # [B*H, Mq, D]
    pooled_k = _block_mean(kf - kf.mean(dim=2, keepdim=True), block_k).flatten(0, 1).transpose(-1, -2)  # [B*H, D, Mk]
    n_q = pooled_q.shape[1]
    heads, rows = _score_tile(B * H, n_q, n_k)
    lut = torch.empty((B * H, n_q, kept), device=q.device, dtype=torch.int32)
    for h0 in range(0, B * H, heads):  # one tile of scores [heads, rows, Mk] at a time, never [Mq, Mk] past the budget
        for r0 in range(0, n_q, rows):
            scores = pooled_q[h0:h0 + heads, r0:r0 + rows] @ pooled_k[h0:h0 + heads]
            lut[h0:h0 + heads, r0:r0 + rows] = scores.topk(kept, dim=-1, sorted=False).indices
    return lut.view(B, H, n_q, kept)


def _sparse_reference(q: Tensor, k: Tensor, v: Tensor, lut: Tensor, block_q: int, block_k: int) -> Tensor:
    """Exact softmax attention of every query over the keys of its query block's kept key blocks.

    Gathers the kept key/value blocks per query block ([B,H,Mq,K*block_k,D]), so memory is what the sparsity keeps,
    never N x N unless everything is kept; then the dense case is plain SDPA (same result, no gather)."""
    B, H, N, D = q.shape
    n_q, n_k, kept = -(-N // block_q), -(-N // block_k), lut.shape[-1]
    if lut.shape != (B, H, n_q, kept) or kept > n_k:
        raise Lite3rError(f"lut has shape {tuple(lut.shape)}, expected [{B}, {H}, {n_q}, K <= {n_k}]")
    acc = torch.promote_types(q.dtype, torch.float32)  # scores and softmax at least in fp32
    if kept == n_k:  # every key block kept (the indices of a topk are distinct): dense attention
        return F.scaled_dot_product_attention(q.to(acc), k.to(acc), v.to(acc)).to(q.dtype)
    pad_k = n_k * block_k - N
    kb = F.pad(k.to(acc), (0, 0, 0, pad_k)).unflatten(2, (n_k, block_k))  # [B, H, Mk, bk, D]
    vb = F.pad(v.to(acc), (0, 0, 0, pad_k)).unflatten(2, (n_k, block_k))
    idx = lut.long().flatten(2)  # [B, H, Mq*K]
    gather = idx[..., None, None].expand(-1, -1, -1, block_k, D)
    kg = kb.gather(2, gather).view(B, H, n_q, kept * block_k, D)  # [B, H, Mq, K*bk, D]
    vg = vb.gather(2, gather).view(B, H, n_q, kept * block_k, D)
    valid = (torch.arange(n_k * block_k, device=q.device) < N).view(n_k, block_k)[idx]  # [B, H, Mq*K, bk]
    valid = valid.view(B, H, n_q, 1, kept * block_k)
    qb = F.pad(q.to(acc), (0, 0, 0, n_q * block_q - N)).unflatten(2, (n_q, block_q))  # [B, H, Mq, bq, D]
    scores = (qb @ kg.transpose(-1, -2)) * D ** -0.5  # [B, H, Mq, bq, K*bk]
    scores = scores.masked_fill(~valid, float("-inf"))  # padded keys of a partial last block
    o = scores.softmax(dim=-1) @ vg  # every row keeps >= 1 real key, so no all -inf rows
    return o.flatten(2, 3)[:, :, :N].to(q.dtype)


@typed
def linear_attention_reference(q: Float[Tensor, "b h n d"], k: Float[Tensor, "b h n d"],
                               v: Float[Tensor, "b h n d"], *, feature_map: str = "softmax",
                               eps: float = LINEAR_EPS) -> Float[Tensor, "b h n d"]:
    """phi(q) (phi(k)^T v) / (phi(q) . sum_n phi(k_n) + eps) over all keys, in (at least) fp32. O(N D^2)."""
    return _linear_reference(q, k, v, feature_map, eps)


def _linear_reference(q: Tensor, k: Tensor, v: Tensor, feature_map: str, eps: float = LINEAR_EPS) -> Tensor:
    if feature_map not in FEATURE_MAPS:
        raise Lite3rError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
    phi = FEATURE_MAPS[feature_map]
    acc = torch.promote_types(q.dtype, torch.float32)
    fq, fk = phi(q.to(acc)), phi(k.to(acc))  # [B, H, N, D]
    kv = fk.transpose(-1, -2) @ v.to(acc)  # [B, H, D, D]
    den = fq @ fk.sum(dim=2).unsqueeze(-1) + eps  # [B, H, N, 1]
    return ((fq @ kv) / den).to(q.dtype)


@typed
def sla_reference(q: Float[Tensor, "b h n d"], k: Float[Tensor, "b h n d"], v: Float[Tensor, "b h n d"],
                  lut: Int32[Tensor, "b h mq kk"], *, block_q: int, block_k: int,
                  feature_map: str = "softmax") -> tuple[Float[Tensor, "b h n d"], Float[Tensor, "b h n d"]]:
    """The oracle: (o_s, o_l) = (block-sparse exact softmax over the LUT's key blocks, linear attention over all
    keys). Differentiable in q, k, v; same dtype out as in."""
    return (_sparse_reference(q, k, v, lut, block_q, block_k),
            _linear_reference(q, k, v, feature_map))


def _common_dtype(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    # Under autocast the q/k norms and RoPE return fp32 while v comes out of the qkv GEMM in bf16 (or all three are
    # fp32); SDPA casts all three to the autocast dtype, and so do we (fp32 would also send the kernels down their
    # slow full-fp32 path). Outside autocast, mixed dtypes are a caller's mistake.
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    if q.dtype == k.dtype == v.dtype:
        return q, k, v
    raise Lite3rError(f"q, k, v must share one dtype outside autocast, got {q.dtype}, {k.dtype}, {v.dtype}")


BRANCHES = ("both", "sparse", "linear")  # SLA, or one of its branches alone (the paper's ablations)


def _needs_grad(*tensors: Tensor, module: nn.Module | None = None) -> bool:
    return torch.is_grad_enabled() and (any(t.requires_grad for t in tensors) or
                                        (module is not None and any(p.requires_grad for p in module.parameters())))


def _project_linear(proj_l: nn.Module, o_l: Tensor, dtype: torch.dtype) -> Tensor:
    """proj_l(o_l) in `dtype`, o_l first cast to proj_l's weight dtype (bf16 features, fp32 proj_l: the student's
    own layout outside autocast, which F.linear alone refuses)."""
    w = getattr(proj_l, "weight", None)
    if isinstance(w, Tensor) and w.dtype != o_l.dtype and not torch.is_autocast_enabled(o_l.device.type):
        o_l = o_l.to(w.dtype)
    return proj_l(o_l).to(dtype)


@typed
def sla_attention(q: Float[Tensor, "b h n d"], k: Float[Tensor, "b h n d"], v: Float[Tensor, "b h n d"], *,
                  topk: float | int, block_q: int = 64, block_k: int = 64, feature_map: str = "softmax",
                  proj_l: nn.Module | None = None, kept_blocks: int | None = None,
                  branches: str = "both") -> Float[Tensor, "b h n d"]:
    """Sparse-Linear Attention: o = o_s + proj_l(o_l) (o = o_s when proj_l is None), scale D**-0.5.

    q, k, v: [B, H, N, D] after q/k norm and RoPE. topk: kept fraction of key blocks per query block (1.0 = dense
    softmax attention). kept_blocks: when set, a count instead: K = min(kept_blocks, Mk) key blocks per query
    block (topk is then ignored), so the sparse cost grows as N, not N^2. proj_l: Linear(D, D) over the last dim,
    shared by heads. Runs the fused kernels when LITE3R_BACKEND allows and they support the device (with nothing to
    differentiate, proj_l folded into the kernel's one output: kernels.sla_output), the PyTorch reference otherwise.
    branches: "both" (SLA), or one branch alone for ablations - "sparse" (o_s; proj_l unused)
    or "linear" (proj_l(o_l), on the reference path).
    """
    if feature_map not in FEATURE_MAPS:
        raise Lite3rError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
    if branches not in BRANCHES:
        raise Lite3rError(f"branches must be one of {BRANCHES}, got {branches!r}")
    if branches == "linear":
        if proj_l is None:
            raise Lite3rError("branches='linear' needs proj_l (the linear branch's output projection)")
        q, k, v = _common_dtype(q, k, v)
        return _project_linear(proj_l, _linear_reference(q, k, v, feature_map), q.dtype)
    if branches == "sparse":
        proj_l = None
    if _check_kept_blocks(kept_blocks) is not None:  # the fraction that gives exactly K blocks
        topk = _kept_fraction(kept_blocks, -(-k.shape[2] // block_k))
    q, k, v = _common_dtype(q, k, v)
    kern = _backend(q, "sla_branches")
    if kern is not None:
        with torch.autocast(q.device.type, enabled=False):  # the kernels keep their own fp32 state
            if proj_l is not None and not _needs_grad(q, k, v, module=proj_l) and hasattr(kern, "sla_output"):
                # inference: proj_l folded into the linear state, one output buffer (no o_l, no proj_l(o_l), no sum:
                # three [B, H, N, D] transients at every SLA layer, the largest of a global block at many views)
                return kern.sla_output(q, k, v, topk=float(topk), block_q=block_q, block_k=block_k,
                                       feature_map=feature_map, weight=proj_l.weight, bias=proj_l.bias)
            o_s, o_l = kern.sla_branches(q, k, v, topk=float(topk), block_q=block_q, block_k=block_k,
                                         feature_map=feature_map)
        return o_s if proj_l is None else o_s + _project_linear(proj_l, o_l, o_s.dtype)
    lut = _block_map(q, k, float(topk), block_q, block_k)
    o_s = _sparse_reference(q, k, v, lut, block_q, block_k)
    if proj_l is None:  # the linear branch would be multiplied by nothing: skip it
        return o_s
    return o_s + _project_linear(proj_l, _linear_reference(q, k, v, feature_map), o_s.dtype)


# ------------------------------------------------------------------------------------------------------- FP8
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value


def _check_finite(x: Tensor, amax: Tensor) -> None:
    # amax is inf for an inf anywhere on its row and NaN for a NaN (amax propagates NaN): one small reduction.
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(amax).all()):
        raise Lite3rError(f"fp8 quantisation of a tensor with inf/NaN values (shape {tuple(x.shape)}, {x.dtype}): "
                         "FP8 scales would be meaningless")


@typed
def fp8_quantize(x: Float[Tensor, "..."], *, axis: int,
                 dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Shaped[Tensor, "..."], Float[Tensor, "..."]]:
    """(x_fp8, scale): scale = max(amax |x| over `axis` in fp32, 1e-12) / fmax, x_fp8 = (x / scale) cast to fp8.

    The scale keeps `axis` as size 1 (fp32). Dequantise with x_fp8.float() * scale. Kernels match this bit for bit:
    the division is a true fp32 division (not a multiply by 1/scale). All-zero rows get scale 1e-12/fmax -> zeros.
    """
    kern = _backend(x, "fp8_quantize") if dtype == torch.float8_e4m3fn else None
    if kern is not None:
        return kern.fp8_quantize(x, axis=axis)
    return _quantize(x, axis, dtype)


def _quantize(x: Tensor, axis: int, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[Tensor, Tensor]:
    fmax = torch.finfo(dtype).max
    xf = x.float()
    amax = xf.abs().amax(dim=axis, keepdim=True)
    _check_finite(x, amax)
    scale = amax.clamp_min(1e-12) / fmax
    return (xf / scale).clamp(-fmax, fmax).to(dtype), scale


@typed
def fp8_fake_quant(x: Float[Tensor, "..."], *, axis: int,
                   dtype: torch.dtype = torch.float8_e4m3fn) -> Float[Tensor, "..."]:
    """x -> dequant(quant(x)) in x's dtype, per slice along `axis` (weights [out, in]: axis=-1 is per output row;
    activations [..., C]: axis=-1 is per token). Straight-through gradient: d out / d x = identity."""
    kern = _backend(x, "fp8_fake_quant") if dtype == torch.float8_e4m3fn else None
    if kern is not None:
        return kern.fp8_fake_quant(x, axis=axis)
    x_fp8, scale = _quantize(x.detach(), axis, dtype)
    x_dq = (x_fp8.float() * scale).to(x.dtype)
    # STE written so the forward value is exactly x_dq: (x - x.detach()) is an exact zero carrying d/dx = 1.
    return x_dq + (x - x.detach()) if x.requires_grad else x_dq


# ------------------------------------------------------------------------------------------------ distillation
@typed
def distill_loss(student_outputs: Sequence[Tensor], teacher_outputs: Sequence[Tensor], *,
                 weights: Sequence[int | float] | Tensor | None = None) -> Float[Tensor, ""]:
    """Mean over aligned pairs of MSE(student_i, teacher_i) in fp32; with `weights`, sum(w_i mse_i) / sum(w_i).

    Raises ValueError naming the first misaligned index (shape) or the two lengths."""
    if len(student_outputs) != len(teacher_outputs):
        raise Lite3rError(f"distill_loss: {len(student_outputs)} student outputs vs {len(teacher_outputs)} teacher "
                         "outputs (do both recorders select the same attention modules?)")
    if not student_outputs:
        raise Lite3rError("distill_loss: no outputs to align (the recorders selected no attention module)")
    for i, (s, t) in enumerate(zip(student_outputs, teacher_outputs)):
        if s.shape != t.shape:
            raise Lite3rError(f"distill_loss: pair {i} differs in shape: student {tuple(s.shape)} vs teacher "
                             f"{tuple(t.shape)}")
    losses = torch.stack([F.mse_loss(s.float(), t.float().to(s.device)) for s, t in zip(student_outputs,
                                                                                       teacher_outputs)])
    if weights is None:
        return losses.mean()
    w = torch.as_tensor(weights, dtype=torch.float32, device=losses.device).flatten()
    if w.numel() != losses.numel():
        raise Lite3rError(f"distill_loss: {w.numel()} weights for {losses.numel()} output pairs")
    if bool((w < 0).any()) or not float(w.sum()) > 0:
        raise Lite3rError(f"distill_loss: weights must be >= 0 with a positive sum, got {w.tolist()}")
    return (w * losses).sum() / w.sum()


# ------------------------------------------------------------------------------------------ attention layouts
# An attention module is read by structure (duck typing: no timm / transformers import): an int head count, the input
# projections (one fused qkv linear, or three), an output projection, and optional parts SLA applies exactly as the
# families that have them do (timm Attention / AttentionRope / EVA / BEiT, transformers ViT / DINOv2 attention, the
# DA3 and VGGT attention). Any other parameter, buffer or submodule could change the result, so it is refused.
_HEADS = ("num_heads", "num_attention_heads")
_IN_PROJ = (("qkv",), ("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
_OUT_PROJ = ("proj", "o_proj", "out_proj")
_OPTIONAL_PARTS = ("q_norm", "k_norm", "norm", "gate", "rope", "attn_drop", "dropout", "proj_drop", "q_bias", "k_bias",
                   "v_bias")
_DROPOUT = ("attn_drop", "attention_dropout", "dropout_prob", "dropout")  # nn.Dropout or the float passed to SDPA
_REL_POS = ("relative_position_bias_table", "relative_position_index", "rel_pos_h", "rel_pos_w", "rel_pos",
            "relative_position_bias", "attn_bias", "logit_scale", "cpb_mlp")
_MASK_ARGS = ("attn_mask", "attention_mask", "attn_bias", "mask", "shared_rel_pos_bias", "shared_rel_pos",
              "position_bias")
# forward arguments SLAAttention understands (a mask / bias: only None; is_causal: only False)
_ARGS = ("pos", "rope", "position_embeddings", "is_causal") + _MASK_ARGS
# the geometry a relative position bias needs (Data2Vec): moot, a module with such a bias is refused at swap time
_IGNORED_ARGS = ("resolution", "interpolate_pos_encoding")


@dataclasses.dataclass(frozen=True)
class _Layout:
    inputs: tuple[str, ...]  # ("qkv",) or the three q / k / v projection names
    output: str | None  # the output projection's name; None: it lives outside (transformers' *SelfAttention)
    heads: int


def _is_linear(m) -> bool:
    return isinstance(m, (nn.Linear, FP8Linear))


def _layout(module: nn.Module) -> _Layout | None:
    heads = next((h for n in _HEADS for h in [getattr(module, n, None)]
                  if isinstance(h, int) and not isinstance(h, bool)), None)
    inputs = next((names for names in _IN_PROJ if all(_is_linear(getattr(module, n, None)) for n in names)), None)
    if heads is None or inputs is None:
        return None
    return _Layout(inputs, next((n for n in _OUT_PROJ if _is_linear(getattr(module, n, None))), None), heads)


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _forward_params(module: nn.Module) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(type(module).forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return []


def _head_dims(module: nn.Module, layout: _Layout) -> tuple[int, int] | str:
    """(head_dim, kv_heads) of an attention module, or why they cannot be read."""
    H = layout.heads
    if len(layout.inputs) == 1:
        out = getattr(module, layout.inputs[0]).out_features
        if out % (3 * H):
            return f"its fused qkv has {out} outputs, not 3 x num_heads ({H}) x head_dim"
        return out // (3 * H), H
    q, k, v = (getattr(module, n).out_features for n in layout.inputs)
    if q % H:
        return f"its query projection has {q} outputs, not a multiple of num_heads {H}"
    D = q // H
    if k != v or k % D or H % (k // D):
        return f"its key / value projections ({k}, {v} outputs) do not give whole groups of {D}-dim heads"
    return D, k // D


def _refusal(module: nn.Module, layout: _Layout, shared_bias: str | None = None) -> str | None:
    """Why SLA would not reproduce `module` exactly, or None."""
    name = type(module).__name__
    known = set(layout.inputs) | {layout.output} | set(_OPTIONAL_PARTS)
    parts = {**module._parameters, **module._buffers, **module._modules}
    for part, value in parts.items():
        if value is None or part in known:
            continue
        if part in _REL_POS:
            return f"it adds a relative position bias ({part}) to the attention scores, which SLA does not"
        return f"it has {part} ({type(value).__name__}), which SLA would not apply"
    dims = _head_dims(module, layout)
    if isinstance(dims, str):
        return dims
    D, _ = dims
    for attr in ("scale", "scaling"):  # timm / DINOv2 keep the softmax scale in `scale`, transformers in `scaling`
        scale = getattr(module, attr, None)
        if isinstance(scale, (int, float)) and not math.isclose(scale, D ** -0.5, rel_tol=1e-6):
            return (f"{name}.{attr} is {scale}, but SLA's softmax uses head_dim**-0.5 = {D ** -0.5:.6g}")
    if getattr(module, "is_causal", False) is True:
        return "it is causal (is_causal=True); SLA attends to every key"
    attn_dim = dims[0] * layout.heads
    for part in ("q_bias", "v_bias", "k_bias"):
        bias = getattr(module, part, None)
        if bias is not None and (len(layout.inputs) != 1 or tuple(bias.shape) != (attn_dim,)):
            return f"its {part} of shape {tuple(bias.shape)} is not a [{attn_dim}] bias of a fused qkv"
    gate = getattr(module, "gate", None)
    if gate is not None and not (_is_linear(gate) and gate.out_features == attn_dim):
        return f"its gate ({type(gate).__name__}) is not a linear to the {attn_dim} attention channels"
    rope = getattr(module, "rope", None)
    if rope is not None and not callable(rope):
        return f"its rope ({type(rope).__name__}) is not callable as rope(t, pos)"
    for p in _forward_params(module)[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in _ARGS:
            continue
        if p.default is inspect.Parameter.empty:
            return f"its forward takes {p.name}, which SLA does not know how to apply"
    through = [p.name for p in _forward_params(module) if p.name in _MASK_ARGS]
    if shared_bias and through:  # BEiT: timm passes it as shared_rel_pos_bias, transformers as attention_mask
        return (f"the model's relative position bias outside it ({shared_bias}) reaches its attention scores "
                f"through {through[0]}")
    return None


def _dropout_p(module: nn.Module) -> float:
    """The largest attention dropout the module has (SLA applies none: p > 0 is refused in training)."""
    ps = [0.0]
    for name in _DROPOUT:
        drop = getattr(module, name, None)
        drop = drop.p if isinstance(drop, nn.Dropout) else drop
        if isinstance(drop, (int, float)) and not isinstance(drop, bool):
            ps.append(float(drop))
    return max(ps)


def _rotate(x: Tensor, half: bool) -> Tensor:
    if half:  # [x0 x1 x2 x3] -> [-x2 -x3 x0 x1]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)  # [x0 x1 ..] -> [-x1 x0 ..]


def _apply_rope_table(t: Tensor, rope: Tensor, prefix: int, half: bool) -> Tensor:
    """timm's rotary convention: `rope` = cat(sin, cos) over the last dim, for the tokens after `prefix`."""
    sin, cos = rope.chunk(2, -1)
    x = t[:, :, prefix:]
    rotated = (x * cos + _rotate(x, half) * sin).to(x.dtype)
    return torch.cat([t[:, :, :prefix], rotated], dim=2)


def _apply_cos_sin(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' convention (DINOv3): position_embeddings = (cos, sin) for the last tokens, half rotation."""
    prefix = t.shape[-2] - sin.shape[-2]  # cls + register tokens
    x = t[:, :, prefix:]
    return torch.cat([t[:, :, :prefix], x * cos + _rotate(x, True) * sin], dim=2)


class SLAAttention(nn.Module):
    """Drop-in SLA replacement of an attention module, read by structure: an int `num_heads` (or
    `num_attention_heads`), a fused `qkv` linear or three `q_proj/k_proj/v_proj` (or `query/key/value`) linears, and
    a `proj` (or `o_proj`, `out_proj`) linear, or none (transformers' *SelfAttention, projected by its caller);
    optionally q_norm / k_norm, q_bias / v_bias of a fused qkv (BEiT, EVA), a `rope` callable rope(t, pos) (VGGT,
    DA3), a timm rope table forward(x, rope=...) or transformers' forward(x, position_embeddings=(cos, sin)),
    grouped key / value heads, an output `norm` (timm scale_norm), a sigmoid `gate` and proj_drop.

    Keeps the original submodules and parameters (same objects, same state-dict keys) and adds
    `proj_l = Linear(D, D)`, zero-init, so at init the output is block-sparse attention (dense attention at topk=1).
    forward takes the replaced module's arguments. What SLA cannot honour is refused with a one-line Lite3rError,
    never skipped: at construction anything `survey_attention` refuses (a relative position bias, a softmax scale
    other than head_dim**-0.5, a part it does not know), at call time a real mask / bias or is_causal=True, and
    attention dropout p > 0 in training."""

    def __init__(self, attn: nn.Module, *, topk: float = 0.05, block_q: int = 64, block_k: int = 64,
                 feature_map: str = "softmax", kept_blocks: int | None = None, branches: str = "both"):
        super().__init__()
        if branches not in BRANCHES:
            raise Lite3rError(f"branches must be one of {BRANCHES}, got {branches!r}")
        self.branches = branches  # "both" (SLA), or "sparse" / "linear" alone (ablations)
        layout = _layout(attn)
        if layout is None:
            raise TypeError(f"{type(attn).__name__} is not an attention module (needs a qkv (or q/k/v) linear, a "
                            "proj linear and an int num_heads)")
        reason = _refusal(attn, layout)
        if reason:
            raise Lite3rError(f"{type(attn).__name__}: {reason}; leave this module dense (swap_attention(filter=...))")
        if feature_map not in FEATURE_MAPS:
            raise Lite3rError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
        _num_kept(float(topk), 1)  # validates the range
        self.num_heads = layout.heads
        self.head_dim, self.num_kv_heads = _head_dims(attn, layout)
        self._inputs, self._output = layout.inputs, layout.output
        for part in layout.inputs + ((layout.output,) if layout.output else ()):
            setattr(self, part, getattr(attn, part))
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self.norm = getattr(attn, "norm", None)  # timm scale_norm: on the attention output, before proj
        self.gate = getattr(attn, "gate", None)  # timm gated attention: proj(norm(o) * sigmoid(gate(x)))
        self.rope = getattr(attn, "rope", None)  # a module (registered) or a plain callable rope(t, pos)
        self.proj_drop = getattr(attn, "proj_drop", None)
        for part in ("q_bias", "k_bias", "v_bias"):  # same objects; a buffer stays (non-)persistent as it was
            value = getattr(attn, part, None)
            if isinstance(value, nn.Parameter) or value is None:
                setattr(self, part, value)
            else:
                self.register_buffer(part, value, persistent=part not in attn._non_persistent_buffers_set)
        self.num_prefix_tokens = int(getattr(attn, "num_prefix_tokens", 0) or 0)  # timm rope tables skip these
        self.rotate_half = bool(getattr(attn, "rotate_half", False))
        self.attn_drop_p = _dropout_p(attn)
        self.scope = getattr(attn, "scope", "global")
        params = _forward_params(attn)
        # the replaced forward's positional parameter names, the input's first (x, hidden_states, ...)
        self._arg_names = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
        self._arg_names = self._arg_names or ("x",)
        ret = inspect.signature(type(attn).forward).return_annotation if params else None
        self._returns_tuple = "tuple" in str(ret).lower()  # transformers: (output, attention weights)
        self.topk, self.block_q, self.block_k, self.feature_map = float(topk), block_q, block_k, feature_map
        self.kept_blocks = _check_kept_blocks(kept_blocks)  # a count of key blocks per query block (None: topk)
        w = getattr(self, layout.inputs[0]).weight  # proj_l follows the model's dtype (not fp8, when swapping a
        self.proj_l = nn.Linear(self.head_dim, self.head_dim, device=w.device,  # deployed model)
                                dtype=w.dtype if w.dtype.itemsize > 1 else None)
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)
        # inference: the per-token work around the attention (qkv projection, q/k norms, RoPE, output projection)
        # over at most this many tokens at a time, into q/k/v and output buffers in the attention's dtype: at 1024
        # VGGT views the whole-sequence qkv and its fp32 norm / RoPE temporaries are ~30 GB, one chunk's are small
        self.chunk_tokens: int | None = None

    def _arguments(self, args: tuple, kwargs: dict) -> tuple[Tensor, dict]:
        if len(args) > len(self._arg_names):
            raise TypeError(f"SLAAttention.forward got {len(args)} positional arguments, the replaced module "
                            f"takes {len(self._arg_names)}")
        call = dict(zip(self._arg_names, args))
        for name, value in kwargs.items():
            if name in call:
                raise TypeError(f"SLAAttention.forward got multiple values for {name}")
            call[name] = value
        if self._arg_names[0] not in call:
            raise TypeError(f"SLAAttention.forward needs its input ({self._arg_names[0]})")
        return call.pop(self._arg_names[0]), call

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, N, _ = x.shape
        if len(self._inputs) == 1:
            qkv = getattr(self, self._inputs[0])(x)
            if self.q_bias is not None or self.v_bias is not None:  # BEiT / EVA: the bias lives beside the linear
                zeros = torch.zeros(self.num_heads * self.head_dim, dtype=qkv.dtype, device=qkv.device)
                qkv = qkv + torch.cat([zeros if b is None else b.to(qkv.dtype)
                                       for b in (self.q_bias, self.k_bias, self.v_bias)])
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        q, k, v = [getattr(self, n)(x).reshape(B, N, -1, self.head_dim).transpose(1, 2) for n in self._inputs]
        return q, k, v

    def forward(self, *args, **kwargs):
        x, call = self._arguments(args, kwargs)
        pos, rope, cos_sin = call.pop("pos", None), call.pop("rope", None), call.pop("position_embeddings", None)
        if call.pop("is_causal", False) is not False:
            raise Lite3rError("SLAAttention got is_causal=True: causal attention is not supported by SLA; leave this "
                              "module dense (swap_attention(filter=...))")
        # callers pass attn_mask=None (timm), attn_bias=None (DINOv2), attention_mask=None (transformers); a real
        # mask or bias cannot be honoured
        given = [name for name, value in call.items()
                 if value is not None and value is not False and name not in _IGNORED_ARGS]
        if given:
            raise Lite3rError(f"SLAAttention got {', '.join(given)}: masked or biased attention is not supported by "
                              "SLA; leave this module dense (swap_attention(filter=...))")
        if self.training and self.attn_drop_p > 0:  # eval (dropout off) is exact; training would silently differ
            raise Lite3rError(f"SLAAttention cannot apply the replaced module's attention dropout (p="
                              f"{self.attn_drop_p}) in training; set it to 0 or leave this module dense")
        shape = x.shape  # [B, N, C], or [B, *spatial, C] (VOLO: [B, H, W, C]): every token attends to every token
        if x.dim() < 3:
            raise Lite3rError(f"SLAAttention takes tokens [B, N, C] (or [B, ..., C]); got shape {tuple(shape)}")
        x = x.flatten(1, -2) if x.dim() > 3 else x
        B, N, _ = x.shape
        n = self.chunk_tokens
        if n is not None and N > n and self.gate is None and rope is None and cos_sin is None and \
                not torch.is_grad_enabled():
            o = self._attend(*self._qkv_chunked(x, pos, n))
            out = None
            for i in range(0, N, n):  # [B, H, n, D] -> [B, n, H * D] -> output projection, a chunk at a time
                y = self._output_of(o[:, :, i:i + n].transpose(1, 2).reshape(B, -1, self.num_heads * self.head_dim))
                out = y.new_empty((B, N, y.shape[-1])) if out is None else out
                out[:, i:i + n] = y
                del y  # (not alive through the next chunk's)
            out = out.reshape(*shape[:-1], out.shape[-1])
            return (out, None) if self._returns_tuple else out
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        o = self._attend(*self._qkv(x, pos, rope, cos_sin))
        o = o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        o = self._output_of(o, gate)
        o = o.reshape(*shape[:-1], o.shape[-1])
        return (o, None) if self._returns_tuple else o

    def _qkv(self, x: Tensor, pos, rope, cos_sin) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, N, C] -> q [B, H, N, D], k, v [B, H_kv, N, D]: projection, q/k norms, RoPE."""
        q, k, v = self._project(x)  # [B, H, N, D]; k, v: [B, H_kv, N, D]
        if self.q_norm is not None:
            q = self.q_norm(q)
        if self.k_norm is not None:
            k = self.k_norm(k)
        if isinstance(rope, Tensor):  # timm: a sin/cos table for the non-prefix tokens
            q = _apply_rope_table(q, rope, self.num_prefix_tokens, self.rotate_half).type_as(v)
            k = _apply_rope_table(k, rope, self.num_prefix_tokens, self.rotate_half).type_as(v)
        elif rope is not None:
            raise Lite3rError(f"SLAAttention got rope={type(rope).__name__}: expected a timm sin/cos table (Tensor)")
        elif cos_sin is not None:  # transformers: (cos, sin)
            if not (isinstance(cos_sin, (tuple, list)) and len(cos_sin) == 2):
                raise Lite3rError(f"SLAAttention got position_embeddings={type(cos_sin).__name__}: expected (cos, sin)")
            q, k = _apply_cos_sin(q, *cos_sin), _apply_cos_sin(k, *cos_sin)
        elif self.rope is not None and pos is not None:
            q, k = self.rope(q, pos), self.rope(k, pos)
        return q, k, v

    def _qkv_chunked(self, x: Tensor, pos: Tensor | None, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """_qkv over token chunks of n into buffers allocated once, in the dtype the attention takes them
        (_common_dtype: per-token work, so the same values as the whole sequence at once, to GEMM rounding).
        pos: raw positions [B, N, 2] or a RoPE table with the tokens on its third-from-last axis."""
        N = x.shape[1]
        bufs: list[Tensor] = []
        for i in range(0, N, n):
            p = None if pos is None else pos.narrow(1 if pos.dim() == 3 else pos.dim() - 3, i, min(n, N - i))
            parts = self._qkv(x[:, i:i + n], p, None, None)
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) \
                else parts[2].dtype
            if not bufs:
                bufs = [t.new_empty((*t.shape[:2], N, t.shape[-1]), dtype=dtype) for t in parts]
            for buf, t in zip(bufs, parts):
                buf[:, :, i:i + n] = t
            del parts, t  # (else this chunk's q / k / v and qkv output live on through the next chunk's)
        return bufs[0], bufs[1], bufs[2]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """SLA of q [B, H, N, D] and k, v [B, H_kv, N, D] -> [B, H, N, D]."""
        if self.num_kv_heads != self.num_heads:  # grouped keys / values: head h reads kv head h // group
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        return sla_attention(q, k, v, topk=self.topk, block_q=self.block_q, block_k=self.block_k,
                             feature_map=self.feature_map, proj_l=self.proj_l,
                             kept_blocks=self.kept_blocks, branches=self.branches)

    def _output_of(self, o: Tensor, gate: Tensor | None = None) -> Tensor:
        """Attention output tokens [B, n, H * D] -> (norm, gate,) output projection (and its dropout)."""
        if self.norm is not None:
            o = self.norm(o)
        if gate is not None:
            o = o * gate
        if self._output is not None:  # None: the caller projects (transformers' *SelfAttention + *SelfOutput)
            o = getattr(self, self._output)(o)
        if self.proj_drop is not None:
            o = self.proj_drop(o)
        return o

    @property
    def dataflow_input(self) -> str | None:
        """The child that alone reads this module's input (fuse_fp8_inputs): a fused qkv, when no gate reads it."""
        return self._inputs[0] if len(self._inputs) == 1 and self.gate is None else None

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, topk={self.topk}, kept_blocks={self.kept_blocks}, "
                f"block_q={self.block_q}, block_k={self.block_k}, feature_map={self.feature_map!r}, "
                f"scope={self.scope!r}" + (f", branches={self.branches!r}" if self.branches != "both" else ""))


class FP8FakeQuantLinear(nn.Linear):
    """nn.Linear whose weight (per output row) and input (per token) go through fp8_fake_quant: QAT for FP8Linear.
    Same parameters and state-dict keys as the nn.Linear it replaces."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8FakeQuantLinear":
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters: no copy, keys unchanged
        return new

    def forward(self, x: Tensor) -> Tensor:
        return _add_bias(F.linear(fp8_fake_quant(x, axis=-1), fp8_fake_quant(self.weight, axis=-1)), self.bias)


def _add_bias(out: Tensor, bias: Tensor | None) -> Tensor:
    # The one bias placement of the FP8 linears: after the GEMM, in its output dtype, where the deployed W8A8 GEMM
    # (torch._scaled_mm) leaves it; the fake-quant student adds it there too, so deploy computes what QAT trained
    # (inside F.linear it would be rounded once less, and that ulp flips FP8 roundings and block choices downstream).
    # At inference the GEMM's fresh output takes the bias in place: no second [tokens, out] buffer (issue 17's peak).
    if bias is None:
        return out
    if _needs_grad(out, bias):
        return out + bias.to(out.dtype)
    return out.add_(bias.to(out.dtype))


_SCALED_MM: dict = {}  # device type -> whether torch._scaled_mm runs rowwise-scaled e4m3 there (probed once)


def _scaled_mm_ok(device: torch.device) -> bool:
    """sm90+ CUDA, or a CPU build whose _scaled_mm takes rowwise-scaled e4m3 (probed once, cached)."""
    key = (device.type, device.index if device.type == "cuda" else None)
    if key not in _SCALED_MM:
        ok = False
        try:
            if device.type == "cuda":
                ok = torch.cuda.get_device_capability(device) >= (9, 0)
            elif device.type == "cpu":
                a = torch.ones(16, 16).to(torch.float8_e4m3fn)
                out = torch._scaled_mm(a, a.t(), scale_a=torch.full((16, 1), 2.0), scale_b=torch.ones(1, 16),
                                       out_dtype=torch.float32)
                ok = bool(torch.allclose(out, torch.full((16, 16), 32.0)))
        except Exception:
            ok = False
        _SCALED_MM[key] = ok
    return _SCALED_MM[key]


class FP8Linear(nn.Module):
    """Deployment linear: weight float8_e4m3fn [out, in] + weight_scale fp32 [out] (per output row), bias as is.

    W8A8 through torch._scaled_mm with a dynamic per-token activation scale on sm90+ CUDA (and on CPU builds that
    have it when use_scaled_mm=True) when both dims are multiples of 16; otherwise F.linear(fake-quantised x,
    dequantised weight): the FP8FakeQuantLinear's computation, bit for bit. The bias is added after the GEMM on
    both paths, where the student adds it."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # buffers, not parameters: nothing here trains (and optimizers / requires_grad_ never see them)
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device,
                                                   dtype=torch.float8_e4m3fn))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        # None: W8A8 on CUDA (sm90+); True: also on a CPU build that has _scaled_mm; False: always the F.linear path
        self.use_scaled_mm: bool | None = None
        # the op before this linear when fuse_fp8_inputs moved it here ("layer_norm", "gelu"): fused with the
        # activation quantisation on the W8A8 path; its LayerNorm in a plain list (its parameters stay its parent's)
        self.input_op: str | None = None
        self._input_norm: list[nn.LayerNorm] = []

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device=w.device)
        w_fp8, scale = fp8_quantize(w, axis=-1)
        new.weight.copy_(w_fp8)
        new.weight_scale.copy_(scale.view(-1))
        if linear.bias is not None:
            new.bias = linear.bias.detach().clone()
        _scaled_mm_ok(w.device)  # probe eagerly, never inside a compiled region
        return new

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() cast every floating buffer, float8 included: the fp8 weight and its fp32 scale
        # take the device moves only (their dtypes are the format); the bias follows the model.
        order = list(self._buffers)
        fixed = {n: self._buffers.pop(n) for n in ("weight", "weight_scale")}
        try:
            super()._apply(fn, recurse)
        finally:
            for n in order:
                self._buffers[n] = fixed[n].to(fn(fixed[n][:0]).device) if n in fixed else self._buffers.pop(n)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The fake-quantised weight (bit-identical to fp8_fake_quant(w, axis=-1) of the original fp32 weight)."""
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)

    def _w8a8(self, x: Tensor) -> bool:
        if self.use_scaled_mm is False or self.in_features % 16 or self.out_features % 16:
            return False
        if x.device.type != "cuda" and self.use_scaled_mm is not True:
            # CPU _scaled_mm dequantises and runs a GEMM of its own (no faster, and 1 ulp off F.linear at some
            # shapes, which flips roundings downstream): the F.linear path is the student's computation, bit for bit
            return False
        if torch.compiler.is_compiling():  # read the cache only: probing is eager work
            return _SCALED_MM.get((x.device.type, x.device.index if x.device.type == "cuda" else None), False)
        return _scaled_mm_ok(x.device)

    def _input(self, x: Tensor) -> Tensor:
        """The op fuse_fp8_inputs moved into this linear, as its module computed it (F.layer_norm / F.gelu)."""
        if self.input_op == "layer_norm":
            norm = self._input_norm[0]
            return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        return F.gelu(x) if self.input_op == "gelu" else x

    def _quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [M, in] -> (fp8 [M, in], scale [M, 1]) of the input op's output: one fused kernel (LayerNorm or GELU +
        amax + scale + cast) when the kernels have it, else the op then fp8_quantize."""
        op = self.input_op
        kern = _backend(x, f"{op}_fp8") if op is not None else None
        if kern is None:
            return fp8_quantize(self._input(x), axis=-1)
        if op == "gelu":  # GELU in the input's dtype (autocast leaves it there)
            return kern.gelu_fp8(x)
        norm = self._input_norm[0]  # autocast runs LayerNorm in fp32; without it, in the input's dtype
        ln_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
        return kern.layer_norm_fp8(x, norm.weight, norm.bias, eps=norm.eps, ln_dtype=ln_dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self._w8a8(x):  # the student's computation, on the stored fp8 weight (fake-quant activations too)
            return _add_bias(F.linear(fp8_fake_quant(self._input(x), axis=-1), self.dequantized_weight(x.dtype)),
                             self.bias)
        shape = x.shape
        x_fp8, x_scale = self._quantize_input(x.reshape(-1, self.in_features))  # [M, in], [M, 1]
        # rowwise-scaled _scaled_mm on CUDA only emits bf16; the fp32 accumulator is scaled before that rounding
        out_dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32
        out = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=x_scale, scale_b=self.weight_scale.view(1, -1),
                               out_dtype=out_dtype)
        out = _add_bias(out, self.bias)
        # like nn.Linear: the autocast dtype under autocast (LayerNorm hands us fp32 there), else the input's
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        return out.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
                + (f", input_op={self.input_op!r}" if self.input_op else ""))


class FusedLayerNorm(nn.LayerNorm):
    """A LayerNorm whose work the FP8Linear reading its output does (fuse_fp8_inputs): same parameters and
    state-dict keys; its forward hands the input on unnormalised."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class FusedGELU(nn.GELU):
    """A GELU whose work the FP8Linear reading its output does (fuse_fp8_inputs); its forward is the identity."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def fuse_fp8_inputs(model: nn.Module) -> int:
    """Move each LayerNorm / exact GELU that feeds an FP8Linear alone into that linear, where its per-token
    activation quantisation fuses with it (kernels.layer_norm_fp8 / gelu_fp8 on the W8A8 path: no pass that
    writes the op's output and reads it back; elsewhere the same op in PyTorch, bit for bit). In place; returns how
    many linears took an op. Only where modules declare the dataflow that makes it exact:
    `dataflow_feeds = {"norm1": "attn", ...}` (that child's output is read by that other child alone) and, on a
    reader that is not itself the linear, `dataflow_input = "qkv"` (the child that alone reads its input);
    lite3r_backbones' Block / Mlp / Attention and SLAAttention declare them. The op modules keep their parameters
    and keys (FusedLayerNorm, FusedGELU), so state dicts and artifacts do not change. LITE3R_FUSE_FP8=0 turns it
    off (A/B measurements)."""
    if os.environ.get("LITE3R_FUSE_FP8", "1") == "0":
        return 0
    n = 0
    for module in list(model.modules()):
        for op_name, reader_name in dict(getattr(module, "dataflow_feeds", None) or {}).items():
            op, reader = getattr(module, op_name, None), getattr(module, reader_name, None)
            linear = reader if isinstance(reader, FP8Linear) else getattr(reader, getattr(reader, "dataflow_input",
                                                                                        None) or "", None)
            if not isinstance(linear, FP8Linear) or linear.input_op is not None:
                continue
            if type(op) is nn.LayerNorm and len(op.normalized_shape) == 1 and op.normalized_shape[0] == \
                    linear.in_features:
                new = FusedLayerNorm(op.normalized_shape, eps=op.eps, elementwise_affine=op.elementwise_affine,
                                     bias=op.bias is not None, device="meta")
                new.weight, new.bias = op.weight, op.bias  # the same Parameters: no copy, keys unchanged
                new.train(op.training)
                linear.input_op, linear._input_norm = "layer_norm", [new]
            elif type(op) is nn.GELU and op.approximate == "none":
                new, linear.input_op = FusedGELU(), "gelu"
            else:
                continue
            setattr(module, op_name, new)
            n += 1
    return n


# ------------------------------------------------------------------------------------------------------ surgery
def is_attention(module: nn.Module) -> bool:
    """Structural: an int num_heads (or num_attention_heads), a fused qkv linear or q_proj/k_proj/v_proj (or
    query/key/value) linears, and usually a proj (or o_proj, out_proj) linear: timm, transformers, DINOv2, VGGT,
    DA3, SLA. Whether SLA reproduces it exactly is survey_attention's question."""
    return _layout(module) is not None


def swap_modules(model: nn.Module, filter_fn: Callable[[nn.Module, str], bool],
                 replace: Callable[[nn.Module, str], nn.Module]) -> nn.Module:
    """The one module swap every conversion uses (torchao style): in place and post-order (children before their
    parent), every module that `filter_fn(module, fqn)` picks becomes `replace(module, fqn)`; a replacement is not
    visited again. Returns the model, or the replacement when the model itself is picked."""

    def visit(module: nn.Module, fqn: str) -> nn.Module:
        for name, child in list(module.named_children()):
            new = visit(child, f"{fqn}.{name}" if fqn else name)
            if new is not child:
                setattr(module, name, new)
        return replace(module, fqn) if filter_fn(module, fqn) else module

    return visit(model, "")


@dataclasses.dataclass(frozen=True)
class SLAConfig:
    """How a student's attention becomes Sparse-Linear Attention; validated once, here.

    topk: kept fraction of key blocks per query block, in (0, 1]; or per scope, {"global": 0.05, "frame": 0.3}
      (scopes not named keep `default_topk`); or a callable (module, fqn) -> fraction.
    scopes: the attention scopes made SLA (a module's `scope` attribute; absent means "global"); None: all.
    block_q / block_k: block sizes in tokens; feature_map: the linear branch's phi (softmax, elu, relu).
    kept_blocks: a count of key blocks per query block instead of the fraction (every SLA module; topk is then
      ignored): K = min(kept_blocks, Mk), a sparse cost linear in N."""

    topk: float | dict | Callable[[nn.Module, str], float] = 0.05
    block_q: int = 64
    block_k: int = 64
    feature_map: str = "softmax"
    scopes: tuple[str, ...] | None = ("global",)
    default_topk: float = 1.0  # for scopes a per-scope topk does not name
    kept_blocks: int | None = None

    def __post_init__(self):
        _check_kept_blocks(self.kept_blocks, "SLAConfig.kept_blocks")
        if isinstance(self.topk, dict):
            object.__setattr__(self, "topk", dict(self.topk))  # a private copy: the config stays as built
            for scope, value in self.topk.items():
                _check_topk(value, f"topk[{scope!r}]")
        elif not callable(self.topk):
            _check_topk(self.topk, "topk")
        _check_topk(self.default_topk, "default_topk")
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise Lite3rError(f"SLAConfig.{name} must be a positive int (tokens per block), got {value!r}")
        if self.feature_map not in FEATURE_MAPS:
            raise Lite3rError(f"SLAConfig.feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.scopes is not None:
            scopes = (self.scopes,) if isinstance(self.scopes, str) else tuple(self.scopes)
            if not scopes or not all(isinstance(x, str) for x in scopes):
                raise Lite3rError(f"SLAConfig.scopes must be None (all) or scope names like ('global',), got "
                                 f"{self.scopes!r}")
            object.__setattr__(self, "scopes", scopes)

    def selects(self, module: nn.Module, fqn: str = "") -> bool:
        """Whether this config makes `module` (an attention module) SLA."""
        return self.scopes is None or getattr(module, "scope", "global") in self.scopes

    def topk_for(self, module: nn.Module, fqn: str = "") -> float:
        if callable(self.topk):
            value = self.topk(module, fqn)
            _check_topk(value, f"topk({fqn!r})")
            return float(value)
        if isinstance(self.topk, dict):
            return float(self.topk.get(getattr(module, "scope", "global"), self.default_topk))
        return float(self.topk)

    def to_json(self) -> dict:
        """The config as JSON (saved with students and deploy artifacts); a callable topk cannot be saved."""
        if callable(self.topk) and not isinstance(self.topk, dict):
            raise Lite3rError("SLAConfig with a callable topk cannot be saved: use a fraction or a per-scope dict")
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_json(cls, d: dict) -> "SLAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise Lite3rError(f"SLAConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**d)


def _check_topk(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise Lite3rError(f"{name} is the kept fraction of key blocks, in (0, 1]; got {value!r}")


def _default_fp8_filter(module: nn.Module, fqn: str) -> bool:
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _proj_l_ids(model: nn.Module) -> set[int]:
    return {id(m.proj_l) for m in model.modules() if isinstance(m, SLAAttention)}


@dataclasses.dataclass
class SwapReport:
    attention_swapped: int
    linear_swapped: int
    trainable_params: int
    total_params: int
    attention: tuple = ()  # AttentionEntry per attention module found (survey_attention), after the swap

    def by_class(self) -> dict[str, dict[str, int]]:
        """{attention class: {status: count}} over `attention` (statuses: swapped, sla, dense, refused)."""
        out: dict[str, dict[str, int]] = {}
        for e in self.attention:
            counts = out.setdefault(e.cls, {})
            counts[e.status] = counts.get(e.status, 0) + 1
        return out

    def __str__(self) -> str:
        rows = [("attention -> SLA", f"{self.attention_swapped:,}"), ("linear -> FP8 fake quant",
                f"{self.linear_swapped:,}"), ("trainable params (proj_l)", f"{self.trainable_params:,}"),
                ("total params", f"{self.total_params:,}"),
                ("trainable fraction", f"{self.trainable_params / max(self.total_params, 1):.4%}")]
        width = max(len(r[0]) for r in rows)
        lines = [f"{name:<{width}}  {value:>14}" for name, value in rows]
        for cls, counts in self.by_class().items():
            reasons = sorted({e.reason for e in self.attention if e.cls == cls and e.status == "dense"})
            done = ", ".join(f"{n} {status}" for status, n in counts.items())
            lines.append(f"{cls}: {done}" + (f" (dense: {'; '.join(reasons)})" if reasons else ""))
        return "\n".join(lines)


def _no_root(kind: str):
    def refuse(module: nn.Module, fqn: str) -> nn.Module:
        raise Lite3rError(f"the model itself is {kind}: wrap it in a container to swap it in place")
    return refuse


@dataclasses.dataclass(frozen=True)
class AttentionEntry:
    """One attention module as a swap sees it. status: "swap" (SLA reproduces it; "swapped" once done), "sla"
    (already SLA), "dense" (not selected, or a kind SLA does not take; `reason` says which) or "refused" (selected,
    but SLA would not reproduce it exactly; `reason` says why)."""

    fqn: str
    cls: str
    status: str
    reason: str = ""


def _shared_rel_pos(model: nn.Module) -> str | None:
    """The fqn of a relative position bias held outside the attention modules (BEiT's shared table, a layer's own
    in transformers' BEiT, timm's shared RelPosMlp), if any."""
    for fqn, m in model.named_modules():
        if _layout(m) is None and any(isinstance(getattr(m, n, None), Tensor) for n in _REL_POS):
            return fqn or type(m).__name__
    return None


def _unread_attention(module: nn.Module) -> bool:
    """An attention-named module SLA cannot read (Twins' q + kv, LeViT, Hiera, ...) with no readable one inside."""
    name = type(module).__name__
    return (("Attention" in name or name.endswith("Attn")) and _layout(module) is None
            and not any(_layout(m) is not None for m in module.modules()))


def survey_attention(model: nn.Module, config: "SLAConfig | None" = None, *,
                     filter: Callable[[nn.Module, str], bool] | None = None) -> list[AttentionEntry]:
    """Every attention module of `model` (module order) and what convert_to_sla(model, config, filter=filter) would
    do with it; changes nothing. `config` None: every scope."""
    config = SLAConfig(scopes=None) if config is None else config
    shared = _shared_rel_pos(model)
    entries = []
    for fqn, m in model.named_modules():
        cls = _class_name(m)
        layout = None if isinstance(m, SLAAttention) else _layout(m)
        if isinstance(m, SLAAttention):
            entries.append(AttentionEntry(fqn, cls, "sla"))
        elif isinstance(m, nn.MultiheadAttention):
            entries.append(AttentionEntry(fqn, cls, "dense", "nn.MultiheadAttention (packed in_proj, masks, "
                                          "cross-attention) is not a layout SLA swaps"))
        elif layout is None:
            if _unread_attention(m):
                entries.append(AttentionEntry(fqn, cls, "dense", "not a layout SLA reads (an int num_heads, a qkv or "
                                              "q_proj/k_proj/v_proj linear and a proj linear)"))
            continue
        elif not config.selects(m, fqn):
            entries.append(AttentionEntry(fqn, cls, "dense", f"scope {getattr(m, 'scope', 'global')!r} is not in "
                                          f"SLAConfig.scopes {config.scopes}"))
        elif filter is not None and not filter(m, fqn):
            entries.append(AttentionEntry(fqn, cls, "dense", "filter"))
        else:
            reason = _refusal(m, layout, shared)
            entries.append(AttentionEntry(fqn, cls, "refused" if reason else "swap", reason or ""))
    return entries


def _check_survey(model: nn.Module, entries: list[AttentionEntry]) -> None:
    """One line, at once: a refused module (the first, and how many more), or a model where nothing would be SLA."""
    name = type(model).__name__
    refused = [e for e in entries if e.status == "refused"]
    if refused:
        e, more = refused[0], (f" (and {len(refused) - 1} more: {', '.join(r.fqn for r in refused[1:4])}"
                               f"{', ...' if len(refused) > 4 else ''})" if len(refused) > 1 else "")
        raise Lite3rError(f"SLA refuses {e.fqn or name} ({e.cls}): {e.reason}{more}; leave it dense with "
                          "swap_attention(filter=...) (lite3r.survey_attention(model) lists every attention module)")
    if not entries:
        raise Lite3rError(f"no attention module found in {name}: SLA swaps modules with an int num_heads (or "
                          "num_attention_heads), a qkv (or q_proj/k_proj/v_proj, query/key/value) linear and a proj "
                          "(or o_proj) linear; nothing was swapped")
    if not any(e.status in ("swap", "sla") for e in entries):
        e = entries[0]
        raise Lite3rError(f"nothing to swap in {name}: {len(entries)} attention module(s), all left dense "
                          f"({e.fqn} ({e.cls}): {e.reason})")


def _convert_to_sla(model: nn.Module, config: "SLAConfig", filter) -> list[AttentionEntry]:
    entries = survey_attention(model, config, filter=filter)
    _check_survey(model, entries)
    todo = {e.fqn for e in entries if e.status == "swap"}
    if "" in todo:
        _no_root("an attention module")(model, "")

    def to_sla(m: nn.Module, fqn: str) -> nn.Module:
        new = SLAAttention(m, topk=config.topk_for(m, fqn), block_q=config.block_q, block_k=config.block_k,
                           feature_map=config.feature_map, kept_blocks=config.kept_blocks)
        return new.train(m.training)  # the replaced module's mode: an eval model stays in eval

    swap_modules(model, lambda m, fqn: fqn in todo and not isinstance(m, SLAAttention), to_sla)
    return [dataclasses.replace(e, status="swapped") if e.status == "swap" else e for e in entries]


def convert_to_sla(model: nn.Module, config: SLAConfig = SLAConfig(), *,
                   filter: Callable[[nn.Module, str], bool] | None = None) -> int:
    """In place: every attention module that `config` selects (its scopes) and `filter(module, fqn)` accepts
    (default all) -> SLAAttention with the config's topk for it. Returns how many were swapped. Raises Lite3rError
    (one line) when a selected module would not be reproduced exactly (survey_attention says which and why), when
    the model has no attention module, or when none would be SLA."""
    return sum(e.status == "swapped" for e in _convert_to_sla(model, config, filter))


def convert_to_fp8_qat(model: nn.Module, *, filter: Callable[[nn.Module, str], bool] | None = None) -> int:
    """In place: the plain nn.Linear that `filter(module, fqn)` picks (default: in/out features multiples of 16),
    never an SLA proj_l -> FP8FakeQuantLinear (same parameters). Returns how many were swapped."""
    proj_l, pick_fn, n = _proj_l_ids(model), filter or _default_fp8_filter, []

    def pick(m: nn.Module, fqn: str) -> bool:
        ok = type(m) is nn.Linear and id(m) not in proj_l and pick_fn(m, fqn)
        if ok and not fqn:
            _no_root("a Linear")(m, fqn)
        return ok

    swap_modules(model, pick, lambda m, fqn: n.append(fqn) or FP8FakeQuantLinear.from_linear(m))
    return len(n)


def freeze_all_but_proj_l(model: nn.Module) -> SwapReport:
    """Everything frozen except the SLA proj_l parameters (what QAT trains); the report counts them."""
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, SLAAttention):
            m.proj_l.requires_grad_(True)
    params = list(model.parameters())
    n_attn = sum(isinstance(m, SLAAttention) for m in model.modules())
    n_lin = sum(isinstance(m, FP8FakeQuantLinear) for m in model.modules())
    return SwapReport(n_attn, n_lin, sum(p.numel() for p in params if p.requires_grad),
                      sum(p.numel() for p in params))


def swap_attention(model: nn.Module, config: SLAConfig | None = None, *,
                   topk: float | dict | Callable[[nn.Module, str], float] = 0.05, block_q: int = 64,
                   block_k: int = 64, feature_map: str = "softmax", fp8: bool = True,
                   filter: Callable[[nn.Module, str], bool] | None = None,
                   fp8_filter: Callable[[nn.Module, str], bool] | None = None) -> SwapReport:
    """The one-call student, in place: attention -> SLAAttention (`config`, or one built from topk / block_q /
    block_k / feature_map covering every scope; `filter(module, fqn)` narrows it), with `fp8` the linears
    `fp8_filter` picks -> FP8FakeQuantLinear (convert_to_fp8_qat), then everything frozen but proj_l. `topk` may
    be a fraction, a per-scope dict or a callable (module, fqn) -> fraction. The report says, per attention class,
    how many were swapped, already SLA or left dense (and why); a module SLA would not reproduce exactly, or a model
    with nothing to swap, raises Lite3rError at once (convert_to_sla)."""
    if config is None:
        config = SLAConfig(topk=topk, block_q=block_q, block_k=block_k, feature_map=feature_map, scopes=None)
    entries = _convert_to_sla(model, config, filter)
    n_lin = convert_to_fp8_qat(model, filter=fp8_filter) if fp8 else 0
    report = freeze_all_but_proj_l(model)
    return dataclasses.replace(report, attention_swapped=sum(e.status == "swapped" for e in entries),
                               linear_swapped=n_lin, attention=tuple(entries))


class AttentionRecorder:
    """Context manager recording the outputs of a model's attention modules (original or SLA) for distillation.

    select: None (all) | list of indices into the attention modules in module order | callable(module, fqn) -> bool
    | "global" (modules whose `scope` is "global" or absent). `.outputs` / `.names`: the recorded outputs and their
    fqns in module order (a module called twice appears twice, in call order); a module returning a tuple
    (transformers: output, attention weights) is recorded by its first element. Outputs stay after exit."""

    def __init__(self, model: nn.Module, *, select=None):
        found = [(fqn, m) for fqn, m in model.named_modules() if is_attention(m) or isinstance(m, SLAAttention)]
        if select is None:
            chosen = found
        elif select == "global":
            chosen = [(f, m) for f, m in found if getattr(m, "scope", "global") == "global"]
        elif callable(select):
            chosen = [(f, m) for f, m in found if select(m, f)]
        elif isinstance(select, (list, tuple)):
            bad = [i for i in select if not -len(found) <= i < len(found)]
            if bad:
                raise IndexError(f"AttentionRecorder: indices {bad} out of range for {len(found)} attention modules")
            chosen = [found[i] for i in sorted({i % len(found) for i in select})]
        else:
            raise TypeError(f"select must be None, a list of ints, a callable or 'global', got {select!r}")
        self.modules = chosen
        self._records: dict[str, list] = {}
        self._handles: list = []

    def __enter__(self) -> "AttentionRecorder":
        self._records = {fqn: [] for fqn, _ in self.modules}
        for fqn, m in self.modules:
            self._handles.append(m.register_forward_hook(
                lambda mod, args, out, fqn=fqn: self._records[fqn].append(out[0] if isinstance(out, tuple)
                                                                          else out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @property
    def outputs(self) -> list:
        return [t for fqn, _ in self.modules for t in self._records.get(fqn, [])]

    @property
    def names(self) -> list:
        return [fqn for fqn, _ in self.modules for _ in self._records.get(fqn, [])]

    def clear(self) -> None:
        for v in self._records.values():
            v.clear()


# ---------------------------------------------------------------------------------------------------- deployment
def to_fp8_inference(model: nn.Module, *, fp8_filter: Callable[[nn.Module, str], bool] | None = None
                     ) -> nn.Module:
    """Every FP8FakeQuantLinear -> FP8Linear (fp8 weight + per-row scale), and with `fp8_filter(module, fqn)` also
    the plain nn.Linear it picks (never proj_l). In place where possible; returns the model (a new module when the
    model itself is a linear)."""
    proj_l = _proj_l_ids(model)

    def pick(m: nn.Module, fqn: str) -> bool:
        return isinstance(m, FP8FakeQuantLinear) or (fp8_filter is not None and type(m) is nn.Linear
                                                     and id(m) not in proj_l and fp8_filter(m, fqn))

    return swap_modules(model, pick, lambda m, fqn: FP8Linear.from_linear(m))


def deploy(model: nn.Module, *, compile: bool = True) -> nn.Module:
    """Inference model: FP8Linear for the fake-quant linears, eval + frozen, SLA through the kernels when usable
    (sla_attention dispatches by itself), then torch.compile (whole model) when `compile`."""
    model = to_fp8_inference(model).eval().requires_grad_(False)
    fuse_fp8_inputs(model)
    if compile:
        warn_cpu_compile(model)
    return torch.compile(model) if compile else model


def warn_cpu_compile(model: nn.Module) -> None:
    """torch.compile of a model on the CPU builds C++ kernels at its first forward, for minutes with no output: a
    warning first, so that it does not look hung."""
    if any(p.device.type == "cpu" for p in model.parameters()):
        import warnings

        warnings.warn("torch.compile on the CPU: the first forward compiles for ~2 min (a VGGT), later ones are fast; "
                      "deploy without compiling (compile=False / compile_mode=None) to skip it", stacklevel=3)
