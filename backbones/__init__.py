"""Backbones: VGGT and Depth Anything 3, checkpoint-compatible with the official weights.

    model = build_backbone("vggt-1b", device="meta")             # no memory for random init
    load_checkpoint(model, "model.safetensors", device="cuda")    # the official file, tracking head and all, strict
    images, _ = load_images("scene/images", mode="crop")         # [S,3,H,W] in [0,1]
    out = model(images.cuda()[None])                             # pose_enc, depth, world_points, ...
    cams = to_cameras(model, out, images.shape[-2:])             # extrinsics (w2c OpenCV), intrinsics, depth

Each model family module (vggt.py, da3.py) exports ``MODEL`` (the nn.Module class, built as ``MODEL(config)``,
with a static ``to_cameras(out, image_hw)``) and ``CONFIGS`` (name -> frozen config dataclass with a ``name``
field). ``build_backbone(name, **overrides)`` replaces config fields, e.g. ``build_backbone("vggt-1b", lean=False)``.

The tiny backbones ship with weights: teachers pretrained on synthetic scenes by ``lite3r pretrain`` (the files, their
command, seed and metrics in backbones/weights/). ``build_backbone("vggt-tiny")`` loads them; ``weights="random"``
gives a random init, ``weights=PATH`` loads a checkpoint strictly.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from . import vggt as _vggt
from .checkpoint import CheckpointError, load_checkpoint
from .preprocess import list_images, load_images
from lite3r_recon.errors import InvalidInput, MissingInput

# name -> (model class, config)
_REGISTRY: dict[str, tuple[type[nn.Module], object]] = {}


def register(model_cls: type[nn.Module], configs: dict) -> None:
    for name, cfg in configs.items():
        _REGISTRY[name] = (model_cls, cfg)


register(_vggt.VGGT, _vggt.CONFIGS)  # "vggt-1b", "vggt-tiny"

from . import da3 as _da3  # noqa: E402

register(_da3.MODEL, _da3.CONFIGS)  # "da3-large", "da3-tiny"


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_config(name: str, **overrides):
    """The (frozen) config for ``name`` with ``overrides`` applied; clear errors for unknown names/fields."""
    if name not in _REGISTRY:
        raise InvalidInput(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    _, cfg = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cfg)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise InvalidInput(f"{name}: unknown option(s) {', '.join(bad)}; valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


WEIGHTS_DIR = Path(__file__).parent / "weights"
# backbone -> (its shipped weights in WEIGHTS_DIR, with a .json of the command, seed and metrics beside each; the
# inference options they were trained with, applied unless the caller overrides them)
SHIPPED: dict[str, tuple[str, dict]] = {
    "vggt-tiny": ("vggt-tiny.safetensors", {}),
    "da3-tiny": ("da3-tiny.safetensors", {"ref_view_strategy": "first"}),  # trained with view 0 as the reference
}
# config fields that change no parameter: the shipped weights still fit when these are overridden
INFERENCE_FIELDS = frozenset({"lean", "frames_chunk_size", "head_dtype", "grad_checkpointing", "camera_iterations",
                              "with_ray", "normalize", "ref_view_strategy", "kept_fp8", "mlp_chunk_tokens"})


def shipped_weights(name: str) -> Path | None:
    """The file of the weights shipped for backbone `name`, or None when it has none."""
    if name not in SHIPPED:
        return None
    path = WEIGHTS_DIR / SHIPPED[name][0]
    if not path.is_file():
        raise MissingInput(f"{path}: the shipped weights of {name} are missing (a broken install?); "
                                f"pass weights='random' for a random init")
    return path


def build_backbone(name: str, *, device: str | torch.device | None = None,
                   weights: str | os.PathLike | None = None, **overrides) -> nn.Module:
    """Build a registered backbone.

    weights: None -> the shipped weights when `name` has them (the tiny teachers) and no override changes a
    parameter (an override equal to the config's own value changes nothing), else a random init; "shipped" -> the
    shipped weights, loaded strictly whatever the overrides (one that changes a parameter fails); "random" -> a random
    init; a path -> that checkpoint, loaded strictly.
    ``device="meta"`` builds it without allocating and loads nothing (then ``load_checkpoint``)."""
    cls, _ = _REGISTRY.get(name, (None, None))
    cfg = get_config(name, **overrides)
    meta = device is not None and torch.device(device).type == "meta"
    path = None
    if weights is None or str(weights) == "shipped":
        base = get_config(name)
        changed = {k for k, v in overrides.items() if getattr(base, k) != v}
        if weights is not None and (meta or name not in SHIPPED):
            raise InvalidInput(f"build_backbone: {name} has no shipped weights" if name not in SHIPPED else
                               "build_backbone: weights cannot be loaded on the meta device (build, then load_checkpoint)")
        if not meta and (weights is not None or changed <= INFERENCE_FIELDS):
            path = shipped_weights(name)
        if path is not None:
            cfg = get_config(name, **{**SHIPPED[name][1], **overrides})
    elif str(weights) != "random":
        if meta:
            raise InvalidInput("build_backbone: weights cannot be loaded on the meta device (build, then load_checkpoint)")
        path = Path(weights)
        if not path.is_file():
            raise MissingInput(f"weights {path}: no such file")
    if path is not None:  # no random init to throw away: build on meta, assign the loaded tensors
        with torch.device("meta"):
            model = cls(cfg)
        return load_checkpoint(model, path, strict=True, device=device or "cpu")
    if device is None:
        return cls(cfg)
    with torch.device(device):
        return cls(cfg)


def to_cameras(name_or_model: str | nn.Module, out: dict, image_hw) -> dict:
    """Model output -> dict(extrinsics [B,S,3,4] w2c OpenCV, intrinsics [B,S,3,3], depth [B,S,H,W], depth_conf)."""
    name = name_or_model if isinstance(name_or_model, str) else getattr(name_or_model, "name", None)
    if name not in _REGISTRY:
        raise InvalidInput(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    return _REGISTRY[name][0].to_cameras(out, tuple(int(v) for v in image_hw))


__all__ = [
    "CheckpointError",
    "build_backbone",
    "get_config",
    "list_backbones",
    "list_images",
    "load_checkpoint",
    "load_images",
    "register",
    "shipped_weights",
    "to_cameras",
]
