"""Strict, memory-lean checkpoint loading for the backbones (VGGT, DA3, anything with a state dict).

``load_checkpoint(model, path_or_state_dict, *, strict=True, ...)``:
- reads ``.safetensors`` (tensor by tensor) and ``.pt``/``.pth``/``.bin`` state dicts (``torch.load`` with
  ``weights_only=True``, ``mmap=True`` when the file is in the zip format); a dict holding the state dict under
  ``"model"``/``"state_dict"`` is unwrapped;
- strips ``model.`` / ``module.`` prefixes when the file has them and the model does not (DA3 hub files, DDP);
- is strict by default: the error's first line says what is wrong and names the file; the next lines list the first
  missing / unexpected keys and shape mismatches, and say when the file looks like the other model's checkpoint;
- refuses NaN/inf tensors, naming the key;
- never holds a second full copy: a model built on the meta device gets the loaded tensors assigned
  (``load_state_dict(assign=True)``), any other model is filled tensor by tensor with ``copy_``.
"""
from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from lite3r_recon.errors import InvalidInput

# key fragments -> the model family whose checkpoints carry them (matched anywhere in a key, so wrapped keys count)
FAMILY_MARKERS: dict[str, str] = {
    "aggregator.frame_blocks.": "VGGT",
    "backbone.pretrained.": "Depth Anything 3",
}
WRAPPER_PREFIXES = ("module.", "model.")
_SHOW = 5  # keys listed per category in error messages


class CheckpointError(InvalidInput):
    """A checkpoint that cannot be loaded into the model; the message's first line says why."""


def open_safetensors(path: str | os.PathLike, what: str = "safetensors file"):
    """`safe_open(path)` (torch, CPU): the one door to a .safetensors file, so that a truncated, corrupt or non-
    safetensors file (a bad header, sizes that do not cover the file) is one line naming it, never SafetensorError."""
    from safetensors import safe_open

    try:
        return safe_open(os.fspath(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError, OSError, ...: safetensors raises several kinds
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read {what} ({why}); the file may be truncated or corrupt") from None


def read_safetensors(path: str | os.PathLike, what: str = "safetensors file") -> tuple[dict[str, str], dict[str, Tensor]]:
    """(header metadata, every tensor) of a .safetensors file, read through open_safetensors."""
    f = open_safetensors(path, what)
    try:
        return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e}); the file may be truncated or corrupt") from None


class _Source:
    """Uniform lazy access to a checkpoint's tensors: keys, shapes, and one tensor at a time."""

    def __init__(self, obj, label: str):
        self.label = label
        self._st = None
        self._sd: Mapping[str, Tensor] | None = None
        if isinstance(obj, Mapping):
            self._sd = self._unwrap(obj)
            return
        path = pathlib.Path(obj)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such checkpoint file")
        if path.suffix == ".safetensors":
            self._st = open_safetensors(path, "safetensors checkpoint")
            self._keys = list(self._st.keys())
            return
        try:
            mmap = zipfile.is_zipfile(path)  # the legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:
            raise CheckpointError(
                f"{path}: cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                f"the file may be truncated, corrupt, or not a weights-only torch state dict"
            ) from None
        self._sd = self._unwrap(sd)

    def _unwrap(self, sd) -> Mapping[str, Tensor]:
        """A state dict, also when saved inside a training checkpoint under "state_dict" or "model"."""
        for wrapper in ("state_dict", "model"):
            if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
                sd = sd[wrapper]
        if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise CheckpointError(f"{self.label}: expected a state dict (key -> tensor), got {type(sd).__name__}")
        return sd

    def keys(self) -> list[str]:
        return list(self._sd.keys()) if self._sd is not None else self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        if self._sd is not None:
            return tuple(self._sd[key].shape)
        return tuple(self._st.get_slice(key).get_shape())

    def get(self, key: str) -> Tensor:
        if self._sd is not None:
            return self._sd[key]
        try:
            return self._st.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.label}: cannot read tensor {key!r} ({e}); the file may be corrupt") from None


def _strip_wrappers(keys: Iterable[str], model_keys: set[str]) -> dict[str, str]:
    """file key -> model key, removing ``module.``/``model.`` prefixes the file has and the model lacks."""
    mapping = {k: k for k in keys}
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if mapping and all(v.startswith(prefix) for v in mapping.values()) and not any(
                k.startswith(prefix) for k in model_keys
            ):
                mapping = {k: v[len(prefix):] for k, v in mapping.items()}
                changed = True
    return mapping


def _family(keys: Iterable[str]) -> str | None:
    keys = list(keys)
    for marker, family in FAMILY_MARKERS.items():
        if any(marker in k for k in keys):
            return family
    return None


def _fmt(items: list, n: int = _SHOW) -> str:
    shown = ", ".join(str(x) for x in items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def _model_label(model: nn.Module) -> str:
    return getattr(model, "name", None) or type(model).__name__


def check_finite(key: str, t: Tensor, label: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{label}: tensor {key!r} has {bad} NaN/inf values of {t.numel()}; refusing to load it")


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike | Mapping[str, Tensor],
    *,
    strict: bool = True,
    skip_prefixes: Iterable[str] = (),
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load a checkpoint into ``model`` in place and return it.

    Args:
        model: the target module; may live on the meta device (then tensors are assigned, not copied).
        path: a ``.safetensors`` / ``.pt`` / ``.pth`` file, or an in-memory state dict.
        strict: every model key must be in the file and every file key in the model (after ``skip_prefixes``);
            ``strict=False`` loads the keys both have and leaves the rest (shape mismatches are still errors).
        skip_prefixes: file keys to drop on purpose, e.g. ``("track_head.",)`` for a VGGT built with
            ``enable_track=False`` (``model.optional_checkpoint_prefixes`` says what a backbone may leave out).
        device: where tensors go for a meta-device model (default cpu); ignored otherwise (each parameter keeps its
            device and dtype).

    Key and shape problems are found before anything is loaded; a NaN/inf tensor is found while loading, so a
    model that is not on the meta device may then be left partly loaded.
    """
    label = str(path) if not isinstance(path, Mapping) else "state dict"
    src = _Source(path, label)
    skip = tuple(skip_prefixes)
    model_sd = model.state_dict(keep_vars=True)
    model_keys = set(model_sd)
    mapping = _strip_wrappers(src.keys(), model_keys)
    if skip:
        mapping = {fk: mk for fk, mk in mapping.items() if not mk.startswith(skip)}
    file_keys = set(mapping.values())

    missing = sorted(model_keys - file_keys)
    unexpected = sorted(file_keys - model_keys)
    mismatched = [
        f"{mk}: file {list(src.shape(fk))} vs model {list(model_sd[mk].shape)}"
        for fk, mk in mapping.items()
        if mk in model_sd and src.shape(fk) != tuple(model_sd[mk].shape)
    ]
    if mismatched or (strict and (missing or unexpected)):
        message = _mismatch_message(model, label, missing, unexpected, mismatched, file_keys, strict)
        fits = fitting_backbones({mk: src.shape(fk) for fk, mk in mapping.items()})
        if fits and _model_label(model) not in fits:  # another size of the family: say which (the first line)
            first, _, rest = message.partition("\n")
            message = (f"{first}; it is a {' / '.join(fits)} checkpoint: choose that backbone (--model {fits[0]}, "
                       f"or lite3r train --size {fits[0].split('-', 1)[-1]})" + (f"\n{rest}" if rest else ""))
        raise CheckpointError(message)

    meta = any(t.is_meta for t in model_sd.values())
    target = torch.device(device) if device is not None else torch.device("cpu")
    loaded: dict[str, Tensor] = {}
    with torch.no_grad():
        for fk, mk in mapping.items():
            if mk not in model_sd:
                continue
            t = src.get(fk)
            check_finite(mk, t, label)
            dst = model_sd[mk]
            if meta:
                loaded[mk] = t.to(device=target, dtype=dst.dtype)
            else:
                dst.copy_(t)
            del t
    if meta:
        model.load_state_dict(loaded, strict=False, assign=True)
        del loaded
        still_meta = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
        if still_meta:
            raise CheckpointError(
                f"{label}: {len(still_meta)} tensors of the meta-device model {_model_label(model)} were not in the "
                f"checkpoint and have no values: {_fmt(still_meta)}"
            )
    return model


def fitting_backbones(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """The registered backbones a checkpoint with these {key: shape} loads into strictly (what may be absent from
    their files aside); built on the meta device, so this costs no memory. For error messages only."""
    from lite3r_backbones import build_backbone, list_backbones

    fits = []
    for name in list_backbones():
        try:
            model = build_backbone(name, device="meta", weights="random")
        except Exception:  # a backbone that cannot be built here (an optional dependency) fits nothing
            continue
        optional = tuple(getattr(model, "optional_checkpoint_prefixes", ()))
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        have = {k: v for k, v in shapes.items() if not k.startswith(optional) or k in want}
        if set(have) <= set(want) and all(k.startswith(optional) for k in set(want) - set(have)) and all(
                want[k] == tuple(v) for k, v in have.items()):
            fits.append(name)
    return fits


def _mismatch_message(model, label, missing, unexpected, mismatched, file_keys, strict) -> str:
    name = _model_label(model)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected")
    if mismatched:
        parts.append(f"{len(mismatched)} with a different shape")
    lines = [f"{label}: checkpoint does not match {name} ({', '.join(parts)} keys)"]
    file_family, model_family = _family(file_keys), _family(model.state_dict().keys())
    if file_family and model_family and file_family != model_family:
        lines[0] = f"{label}: this looks like a {file_family} checkpoint, but the model is {name} ({model_family})"
    if missing:
        lines.append(f"  missing from the file: {_fmt(missing)}")
    if unexpected:
        lines.append(f"  unexpected in the file: {_fmt(unexpected)}")
        tops = sorted({k.split(".")[0] + "." for k in unexpected})
        if not missing and not mismatched and len(tops) <= 3:
            lines.append(f"  to drop them on purpose: load_checkpoint(..., skip_prefixes={tuple(tops)!r})")
    if mismatched:
        lines.append(f"  shape mismatches: {_fmt(mismatched)}")
    return "\n".join(lines)
