"""The deployable student: FP8 weights + fused SLA + torch.compile, and its one-file artifact.

    student = make_student(build_backbone("vggt-1b"), topk=0.05, fp8=True)   # QAT structure (+ trained proj_l)
    model = deploy_model(student, device="cuda")                             # FP8 W8A8 linears, bf16 rest, compiled
    save_artifact(model, "vggt.lite3r.safetensors")                          # fp8 weights + scales + config JSON
    model = load_artifact("vggt.lite3r.safetensors", device="cuda")          # no QAT model, no teacher file needed

What `deploy_model` does, in order (run the result under bf16 autocast, as the official demos run VGGT):
1. `lite3r.to_fp8_inference`: every FP8 fake-quant linear becomes an `FP8Linear` (float8_e4m3fn weight, fp32
   per-output-row scale; W8A8 `torch._scaled_mm` with per-token dynamic activation scales on sm90+, weight-only
   FP8 elsewhere). Fake quant is gone.
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

import json
import os
from collections.abc import Callable

import torch
from torch import nn

import lite3r

ARTIFACT_FORMAT = "lite3r-deploy/1"


def sla_scope_filter(scope: str) -> Callable[[nn.Module, str], bool]:
    """Which attention modules become SLA: "global" (cross-view only; frame attention stays dense) or "all"."""
    if scope == "all":
        return lambda module, fqn: True
    if scope == "global":
        return lambda module, fqn: getattr(module, "scope", "global") == "global"
    raise ValueError(f"SLA scope must be 'global' or 'all', got {scope!r}")


def make_student(model: nn.Module, *, topk: float = 0.05, fp8: bool = True, scope: str = "global",
                 block_q: int = 64, block_k: int = 64, feature_map: str = "softmax",
                 student: str | os.PathLike | None = None) -> nn.Module:
    """The QAT student in place: SLA on the attention `scope` selects, FP8 fake quant on the linears when `fp8`,
    and the trained `proj_l` of a `student.safetensors` when given (zero-initialised otherwise)."""
    lite3r.swap_attention(model, topk=topk, block_q=block_q, block_k=block_k, feature_map=feature_map, fp8=fp8,
                          filter=sla_scope_filter(scope))
    if student is not None:
        load_proj_l(model, student)
    return model


def load_proj_l(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Copy the trained parameters of a `student.safetensors` (proj_l weights and biases) into `model`, strictly:
    every tensor in the file must name a parameter of the model with the same shape."""
    from safetensors.torch import load_file

    tensors = load_file(os.fspath(path))
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise KeyError(f"{path}: {len(missing)} tensors name no parameter of the model, first {missing[:3]}")
    with torch.no_grad():
        for key, value in tensors.items():
            if params[key].shape != value.shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, model has {tuple(params[key].shape)}")
            params[key].copy_(value)
    return model


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


def deploy_model(model: nn.Module, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16,
                 compile_mode: str | None = "default", regional: bool = True, compile_sla: bool = True,
                 keep_fp32: Callable[[nn.Module, str], bool] | None = geometry_fragile) -> nn.Module:
    """Fake quant -> FP8Linear; the modules `keep_fp32` selects compute in fp32 (`run_in_fp32`), the rest in
    `dtype`; onto `device`; then compiled (compile_mode=None: eager). The SLA kernels are traced into the compiled
    blocks (triton_op); `compile_sla=False` runs the SLA modules eagerly inside them instead (`eager_sla`)."""
    if device is not None:  # first: quantising and casting run faster there
        model = model.to(device)
    model = lite3r.to_fp8_inference(model)
    keep = [m for fqn, m in model.named_modules() if keep_fp32 is not None and keep_fp32(m, fqn)]
    for module in keep:
        run_in_fp32(module)
    cast_floating(model, dtype, keep=lambda m, fqn: getattr(m, "lite3r_fp32", False))
    if not compile_sla:
        eager_sla(model)
    model.eval().requires_grad_(False)
    if compile_mode:
        model = compile_model(model, mode=compile_mode, regional=regional)
    return model


# ---------------------------------------------------------------------------------------------------- artifact
def _sla_settings(model: nn.Module) -> dict:
    """The SLA modules of `model` and their settings: {fqn: {topk, block_q, block_k, feature_map}}."""
    return {fqn: {k: getattr(m, k) for k in ("topk", "block_q", "block_k", "feature_map")}
            for fqn, m in model.named_modules() if isinstance(m, lite3r.SLAAttention)}


def artifact_config(model: nn.Module) -> dict:
    """Everything `load_artifact` needs besides the tensors: backbone name + config, SLA settings per module."""
    import dataclasses

    config = getattr(model, "config", None)
    return {
        "format": ARTIFACT_FORMAT,
        "backbone": getattr(model, "name", None),
        "backbone_config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {},
        "sla": _sla_settings(model),
        "fp32_modules": [fqn for fqn, m in model.named_modules() if getattr(m, "lite3r_fp32", False)],
        "fp8_linears": sum(isinstance(m, lite3r.FP8Linear) for m in model.modules()),
    }


def save_artifact(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> dict:
    """Write the deployed (not compiled) model as one safetensors file: fp8 weights + fp32 scales + the rest in
    their deployed dtype, and the config JSON in the header metadata. Returns the config."""
    from lite3r_recon.io import atomic_save_safetensors

    model = getattr(model, "_orig_mod", model)
    config = artifact_config(model)
    if not config["backbone"]:
        raise ValueError("save_artifact needs a backbone model (with .name and .config) to rebuild it from the file")
    tensors = {k: v.clone() for k, v in model.state_dict().items()}  # clone: no two keys share storage
    atomic_save_safetensors(path, tensors, metadata={"lite3r": json.dumps(config)}, overwrite=overwrite)
    return config


def read_artifact_config(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "lite3r" not in meta:
        raise ValueError(f"{path} is not a lite3r deploy artifact (no 'lite3r' config in its safetensors header)")
    config = json.loads(meta["lite3r"])
    if config.get("format") != ARTIFACT_FORMAT:
        raise ValueError(f"{path}: artifact format {config.get('format')!r}, this lite3r reads {ARTIFACT_FORMAT!r}")
    return config


def _skeleton(config: dict, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The deployed architecture of an artifact: backbone, SLA where it was, FP8Linear for every linear whose
    weight is float8 in the file, fp32 modules as they were, the rest in the file's dtype."""
    from lite3r_backbones import build_backbone

    fp8_linears = {k.rsplit(".", 1)[0] for k, v in tensors.items() if k.endswith(".weight") and v.dtype ==
                   torch.float8_e4m3fn}
    sla = config["sla"]
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in config["backbone_config"].items() if k != "name"}
    model = build_backbone(config["backbone"], **overrides)
    if sla:
        first = next(iter(sla.values()))
        lite3r.swap_attention(model, topk=lambda m, fqn: sla[fqn]["topk"], block_q=first["block_q"],
                              block_k=first["block_k"], feature_map=first["feature_map"], fp8=False,
                              filter=lambda m, fqn: fqn in sla)
    for fqn in fp8_linears:  # empty FP8Linear shells: nothing is quantised, the file holds the fp8 weights
        linear = model.get_submodule(fqn)
        parent, _, name = fqn.rpartition(".")
        setattr(model.get_submodule(parent), name, lite3r.FP8Linear(
            linear.in_features, linear.out_features, bias=linear.bias is not None, device=linear.weight.device))
    for fqn in config["fp32_modules"]:
        run_in_fp32(model.get_submodule(fqn))
    fp32 = tuple(f + "." for f in config["fp32_modules"])
    dtypes = {v.dtype for k, v in tensors.items() if v.is_floating_point() and v.dtype != torch.float8_e4m3fn
              and not k.endswith("weight_scale") and not k.startswith(fp32)}
    if len(dtypes) == 1:  # the deployed dtype, so that non-persistent buffers match the saved model's
        cast_floating(model, dtypes.pop(), keep=lambda m, fqn: getattr(m, "lite3r_fp32", False))
    return model


def load_artifact(path: str | os.PathLike, *, device: str | torch.device | None = None,
                  compile_mode: str | None = None, regional: bool = True) -> nn.Module:
    """Rebuild a deployed model from `save_artifact`'s file alone: backbone architecture, SLA where it was, FP8Linear
    for every linear whose weight is float8 in the file, then the file's tensors assigned as they are (bit-identical
    weights). No teacher checkpoint and no QAT training state is needed."""
    from safetensors.torch import load_file

    config = read_artifact_config(path)
    tensors = load_file(os.fspath(path))
    with torch.device("meta"):  # no memory, no random init, no quantisation: every tensor comes from the file
        model = _skeleton(config, tensors)
    model.load_state_dict(tensors, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):  # non-persistent buffers: build for real
        model = _skeleton(config, tensors)
        model.load_state_dict(tensors, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if device is not None:
        model = model.to(device)
    fp8 = [m for m in model.modules() if isinstance(m, lite3r.FP8Linear)]
    if fp8:  # FP8Linear probes W8A8 support eagerly and only reads the answer while compiled
        lite3r._scaled_mm_ok(fp8[0].weight.device)
    if compile_mode:
        model = compile_model(model, mode=compile_mode, regional=regional)
    return model


def export(out: str | os.PathLike, *, model: str = "vggt-tiny", weights: str | os.PathLike | None = None,
           student: str | os.PathLike | None = None, topk: float = 0.05, scope: str = "global", fp8: bool = True,
           dtype: torch.dtype = torch.bfloat16, overwrite: bool = False) -> dict:
    """`lite3r export`: teacher (checkpoint or random weights) -> student (a trained `student.safetensors` with its
    own SLA / FP8 settings, or a fresh SLA + FP8 student from the arguments) -> deployed on the CPU, uncompiled ->
    artifact. Returns the artifact config."""
    from lite3r_backbones import build_backbone, load_checkpoint
    from lite3r_recon.io import ensure_writable

    ensure_writable(out, overwrite)  # before the (long) build
    teacher = build_backbone(model)
    if weights is not None:
        load_checkpoint(teacher, weights, strict=True)
    if student is not None:  # SLA / FP8 settings as trained (student.json), not the arguments
        from lite3r_recon.train import load_student

        model_ = load_student(student, teacher.eval())
    else:
        model_ = make_student(teacher.eval(), topk=topk, fp8=fp8, scope=scope)
    deployed = deploy_model(model_, dtype=dtype, compile_mode=None)
    return save_artifact(deployed, out, overwrite=overwrite)
