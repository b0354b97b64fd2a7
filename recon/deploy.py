"""The deployed student: FP8 weights + fused SLA + torch.compile (its artifact: lite3r_recon.models).

    model = deploy_model(student, device="cuda")      # FP8 W8A8 linears, bf16 rest, compiled
    (students are built, and artifacts saved / loaded, by lite3r_recon.models: the one door to every model)

What `deploy_model` does, in order (run the result under bf16 autocast, as the official demos run VGGT):
1. `lite3r.to_fp8_inference`: every FP8 fake-quant linear becomes an `FP8Linear` (float8_e4m3fn weight, fp32
   per-output-row scale; W8A8 `torch._scaled_mm` with per-token dynamic activation scales on sm90+, weight-only
   FP8 elsewhere). Fake quant is gone. `lite3r.fuse_fp8_inputs` then moves each LayerNorm / GELU that feeds an
   FP8Linear alone into it: on the W8A8 path one kernel does the op and the per-token quantisation.
2. Geometry-fragile modules (`geometry_fragile`: camera/pose head, last DPT convolution before the depth / point
   activations) compute in fp32 with autocast off (`run_in_fp32`); every other floating tensor goes to `dtype`
   (bf16), FP8 weights and their fp32 scales excepted. Autocast keeps LayerNorm, softmax and RoPE in fp32.
3. `torch.compile` of each repeated block and of each DPT head's per-chunk forward (regional, static shapes:
   compiled once per block kind and chunk size; the glue stays eager) or of the whole model; `mode` as torch.compile takes it ("default",
   "max-autotune-no-cudagraphs", "reduce-overhead" for CUDA graphs). The SLA kernels are torch.library ops, so
   they trace into the compiled blocks (`compile_sla=False` keeps them eager instead).

SLA goes through the fused kernel by itself: `lite3r.sla_attention` dispatches to `kernels` when they are
importable and support the device (LITE3R_BACKEND=auto) and, like SDPA under autocast, casts q/k (fp32 out of the
q/k LayerNorm and RoPE) and v to the autocast dtype.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import lite3r


def cast_floating(model: nn.Module, dtype: torch.dtype, *, keep: Callable[[nn.Module, str], bool] | None = None):
    """Cast floating parameters and buffers to `dtype`, leaving FP8Linear (fp8 weight + fp32 scale) and the
    modules `keep(module, fqn)` selects (with everything under them) as they are. `Module.to(dtype)` would turn
    float8 weights back into bf16 - float8 is a floating dtype."""
    skip: list[str] = []
    for fqn, module in model.named_modules():
        if any(fqn.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, lite3r.FP8Linear) or (keep is not None and keep(module, fqn)):
            skip.append(fqn)
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point() and buf.dtype != dtype:
                setattr(module, name, buf.to(dtype))
    return model


GEOMETRY_FRAGILE = ("camera_head", "cam_dec", "output_conv2")  # module names (last fqn part) kept in fp32


def geometry_fragile(module: nn.Module, fqn: str) -> bool:
    """The default `keep_fp32`: camera / pose regression heads (a few tokens per view: fp32 costs nothing) and the
    last DPT convolution, whose output the depth / point / confidence activations (exp, inverse log) read."""
    return fqn.rsplit(".", 1)[-1] in GEOMETRY_FRAGILE


def _fp32_forward(self, *args, **kwargs):
    """The class forward of `self` with autocast off and floating tensor arguments in fp32."""
    from torch.utils._pytree import tree_flatten, tree_map

    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    device_type = leaves[0].device.type if leaves else "cpu"
    args, kwargs = tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                            (args, kwargs))
    with torch.autocast(device_type, enabled=False):
        return type(self).forward(self, *args, **kwargs)


def run_in_fp32(module: nn.Module) -> nn.Module:
    """Make `module` compute in fp32 whatever the dtype around it: its floating parameters/buffers go to fp32 and
    its forward runs with autocast off on fp32 inputs. (A bound method, so deepcopy rebinds it to the copy.)"""
    import types

    cast_floating(module, torch.float32)  # not module.float(): that would dequantise FP8Linear weights
    module.forward = types.MethodType(_fp32_forward, module)
    module.lite3r_fp32 = True
    return module


def _compute_forward(self, *args, **kwargs):
    """The class forward of a deployed model under autocast to the dtype it was deployed in (`lite3r_dtype`)."""
    with torch.autocast(next(self.parameters()).device.type, dtype=self.lite3r_dtype):
        return type(self).forward(self, *args, **kwargs)


def compute_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make a model whose weights are in `dtype` take inputs of any floating dtype, with or without the caller's
    autocast: its forward runs under autocast to `dtype` (what the official demos wrap it in; fp32 modules turn it
    off inside). Without it fp32 images meet bf16 weights in the first convolution. Nothing to do for fp32."""
    import types

    if dtype != torch.float32:
        model.forward = types.MethodType(_compute_forward, model)
        model.lite3r_dtype = dtype
    return model


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Members of ModuleLists / Sequentials of two or more modules of one class (transformer blocks): the regions
    `compile_model` compiles. Outermost only: a block list inside a block is part of that block."""
    blocks: list[nn.Module] = []
    seen: set[int] = set()
    for module in model.modules():
        if id(module) in seen:
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 1 and \
                len({type(m) for m in module}) == 1 and not isinstance(module[0], (nn.Linear, nn.Conv2d)):
            blocks += list(module)
            seen |= {id(m) for block in module for m in block.modules()}
    return blocks


def compile_regions(model: nn.Module) -> list[nn.Module]:
    """What regional compilation compiles as modules: the repeated blocks (`repeated_blocks`). Blocks of one class
    share their compiled code, so compile time does not grow with depth."""
    return repeated_blocks(model)


def chunked_heads(model: nn.Module) -> list[nn.Module]:
    """Heads that run frames in equal chunks (`forward_frames`, the DPT heads): compiled per chunk, one graph for
    all chunks of one size. (Compiled whole, the loop over chunks unrolls: 85 s of compile at 32 views and 254 s
    at 128 on an H100, docs/benchmarks.md.)"""
    return [m for m in model.modules() if callable(getattr(type(m), "forward_frames", None))]


def compile_model(model: nn.Module, *, mode: str = "default", regional: bool = True) -> nn.Module:
    """torch.compile (static shapes) of each of `compile_regions(model)` and of the `forward_frames` of each of
    `chunked_heads(model)`, in place, or of the whole model (regional=False, or nothing regional found); the glue
    stays eager. Returns the module to call."""
    mode = None if mode == "default" else mode
    lite3r.warn_cpu_compile(model)
    regions = compile_regions(model) if regional else []
    # one Block class serves several block kinds (patch embed, frame, global, fp32 camera trunk): each is a
    # recompile of the same code, and past dynamo's limit (8) the rest would silently run eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if not regions:
        return torch.compile(model, mode=mode, dynamic=False)
    for region in regions:
        region.compile(mode=mode, dynamic=False)
    for head in chunked_heads(model):
        head.forward_frames = torch.compile(head.forward_frames, mode=mode, dynamic=False)
    return model


def _sla_eager_forward(self, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)


def eager_sla(model: nn.Module) -> nn.Module:
    """Keep every SLAAttention out of torch.compile (a graph break around each; they run eagerly inside the compiled
    blocks). A fallback for GPUs / Triton versions where Inductor cannot compile the SLA kernels; not the default."""
    import types

    forward = torch.compiler.disable(_sla_eager_forward)
    for m in model.modules():
        if isinstance(m, lite3r.SLAAttention):
            m.forward = types.MethodType(forward, m)
    return model


# Inference memory (issue 17, docs/benchmarks.md): deployed blocks run their per-token work (MLP, SLA projections,
# frame blocks) over at most this many tokens at a time - one 64k-token chunk's fp32 q/k norm and RoPE temporaries
# are ~1.5 GB for VGGT-1B (262k tokens: ~7 GB, most of the live set at 256 views on the H200) and a GEMM of 64k rows
# still fills the GPU. `head_frames` (None: the model's frames_chunk_size, 8): the DPT heads over that many frames at
# a time - full-resolution features are ~0.3 GB a frame for DA3-Large (the peak of its (d) at 32 views with 8), but
# 2 frames at a time cost VGGT-1B 0.05 s at 32 views (launch-bound heads, H200): a memory option, not the default
MLP_CHUNK_TOKENS = 1 << 16


def set_option(model: nn.Module, name: str, value) -> bool:
    """Set the backbone's inference option `name` (a field of its frozen config: kept_fp8, mlp_chunk_tokens, ...)
    where its config has one. Returns whether it did."""
    import dataclasses

    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config) or name not in {f.name for f in dataclasses.fields(config)}:
        return False
    model.config = dataclasses.replace(config, **{name: value})
    return True


def deploy_model(model: nn.Module, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                 compile_mode: str | None = "default", regional: bool = True, compile_sla: bool = True,
                 keep_fp32: Callable[[nn.Module, str], bool] | None = geometry_fragile,
                 kept_fp8: bool | None = None, mlp_chunk_tokens: int | None = MLP_CHUNK_TOKENS,
                 head_frames: int | None = None) -> nn.Module:
    """Fake quant -> FP8Linear; the modules `keep_fp32` selects compute in fp32 (`run_in_fp32`), the rest in
    `dtype` (whatever the inputs' dtype: `compute_in`); onto `device`; then compiled (compile_mode=None: eager). The
    SLA kernels are traced into the compiled blocks (triton_op); `compile_sla=False` runs the SLA modules eagerly
    inside them instead (`eager_sla`). `mlp_chunk_tokens` / `head_frames`: the inference memory options above."""
    if device is not None:  # first: quantising and casting run faster there
        model = model.to(device)
    model = lite3r.to_fp8_inference(model)
    # memory (docs/benchmarks.md, issue 17): the layers the heads read kept in FP8 (half their bytes) when asked
    # (kept_fp8=True, FP8 students only): opt-in, as it adds error QAT did not train for (3e-3 relative depth on the
    # tiny student against the 1e-3 the deploy path keeps) and is not yet measured on the GPU; MLPs in token chunks
    fp8 = any(isinstance(m, lite3r.FP8Linear) for m in model.modules())
    set_option(model, "kept_fp8", fp8 and bool(kept_fp8))
    set_option(model, "mlp_chunk_tokens", mlp_chunk_tokens)
    if head_frames is not None:
        set_option(model, "frames_chunk_size", head_frames)
    keep = [m for fqn, m in model.named_modules() if keep_fp32 is not None and keep_fp32(m, fqn)]
    for module in keep:
        run_in_fp32(module)
    cast_floating(model, dtype, keep=lambda m, fqn: getattr(m, "lite3r_fp32", False))
    compute_in(model, dtype)
    lite3r.fuse_fp8_inputs(model)  # LayerNorm / GELU + activation quantisation in one kernel (keys unchanged)
    if not compile_sla:
        eager_sla(model)
    model.eval().requires_grad_(False)
    if compile_mode:
        model = compile_model(model, mode=compile_mode, regional=regional)
    return model
