"""The aggregator layers kept for the heads, stored in FP8 (``kept_fp8``): half their bf16 memory.

VGGT and DA3 keep 4 layers [B, S, P, 2C] until the heads run (23 GB in bf16 for VGGT-1B at 1024 views). With
``kept_fp8`` each is a ``KeptFP8``: the patch tokens as float8 e4m3 with one fp32 scale per token and per half
(frame / global half of the concatenation: the two halves have their own ranges), the first ``prefix`` tokens
(camera + register tokens, which the camera heads read) exactly as they were. The heads index it like the tensor
([:, s0:s1, prefix:], [:, :, 0]) and get the dequantised frames of one chunk, so the full-precision layer never
exists. Quantisation is lite3r.fp8_quantize's (scale = max(amax, 1e-12) / 448, true division, clamp), written
here in torch: the backbones import nothing of lite3r. Error of the heads' outputs: docs/benchmarks.md (issue 17).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., C] -> (e4m3 [..., C], fp32 scale [...]): one scale per row of the last dim."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale[..., 0]


class KeptFP8:
    """A [B, S, P, G*C] layer (G halves of C channels concatenated) held as FP8 + scales; see the module docstring.

    ``x[b, s, p]`` (ints or unit-step slices, as the heads index) returns the dequantised tokens in ``dtype``.
    """

    def __init__(self, body: Tensor, scale: Tensor, special: Tensor, dtype: torch.dtype) -> None:
        self.body, self.scale, self.special, self.dtype = body, scale, special, dtype  # [B,S,P',G*C] [B,S,P',G]
        self.prefix = special.shape[2]
        self.shape = torch.Size((*body.shape[:2], self.prefix + body.shape[2], body.shape[3]))

    @classmethod
    def pack(cls, halves: Sequence[Tensor], prefix: int, *, chunk: int | None = 8,
             maps: Sequence[Callable[[Tensor], Tensor] | None] | None = None,
             dtype: torch.dtype | None = None) -> KeptFP8:
        """halves: G tensors [B, S, P, C] -> their concatenation over the last dim, kept as FP8. ``maps[g]`` (e.g. a
        LayerNorm, per token) is applied to half g first. Frames are packed ``chunk`` at a time, so the only
        temporaries are one chunk's (never an fp32 or concatenated copy of the whole layer). ``dtype``: what reads
        return (default: the first half's, after its map)."""
        return kept_layer(halves, prefix, fp8=True, chunk=chunk, maps=maps, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.body, self.scale, self.special))

    def _dequant(self, b, s, p) -> Tensor:
        x = self.body[b, s, p].float()
        sc = self.scale[b, s, p]
        return (x.unflatten(-1, (sc.shape[-1], -1)) * sc[..., None]).flatten(-2).to(self.dtype)

    def __getitem__(self, idx) -> Tensor:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > 3 or any(i is Ellipsis or i is None for i in idx):
            raise TypeError(f"KeptFP8 takes [batch, frames, tokens] indices, got {idx!r}")
        b, s, p = (*idx, slice(None), slice(None), slice(None))[:3]
        P, pre = self.shape[2], self.prefix
        if isinstance(p, int):
            p = p % P
            return self.special[b, s, p] if p < pre else self._dequant(b, s, p - pre)
        start, stop, step = p.indices(P)
        if step != 1:
            raise TypeError(f"KeptFP8 takes unit-step token slices, got {p!r}")
        parts = []
        if start < pre:
            parts.append(self.special[b, s, start:min(stop, pre)])
        if stop > max(start, pre) or not parts:  # (an empty slice: an empty read)
            parts.append(self._dequant(b, s, slice(max(start, pre) - pre, max(stop, pre) - pre)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def frames(self, i0: int, i1: int) -> Tensor:
        """Dequantised tokens of frames i0:i1 of the flattened B*S frames: [i1 - i0, P, G*C] (the DA3 head's
        chunking), in ``dtype``."""
        B, S = self.shape[:2]
        i1 = min(i1, B * S)
        out = []
        for b in range(i0 // S, (i1 - 1) // S + 1):
            lo, hi = max(i0 - b * S, 0), min(i1 - b * S, S)
            out.append(self[b, lo:hi])
        return out[0] if len(out) == 1 else torch.cat(out, dim=0)


def frames(x: Tensor | KeptFP8, i0: int, i1: int) -> Tensor:
    """Frames i0:i1 of a [B, S, ...] layer flattened to B*S frames (a KeptFP8 dequantised)."""
    return x.frames(i0, i1) if isinstance(x, KeptFP8) else x.flatten(0, 1)[i0:i1]


class KeptLayer:
    """One kept layer [B, S, P, G*C] built a half at a time: ``put`` half g (through its per-token map, frames in
    ``order``), then ``result()``. So the frame half can be stored before the global block overwrites it in place
    (layers.Block's ``inplace``). At inference the halves go into the layer (a tensor in ``dtype``, default the first
    half's after its map, or with ``fp8`` a KeptFP8) ``chunk`` frames at a time: no whole-half temporary (a mapped
    or reordered copy) ever exists. With grad enabled the halves are concatenated, differentiably."""

    def __init__(self, groups: int, prefix: int, *, fp8: bool, chunk: int | None, dtype: torch.dtype | None = None,
                 order: Tensor | None = None) -> None:
        self.groups, self.prefix, self.fp8, self.chunk, self.dtype, self.order = groups, prefix, fp8, chunk, dtype, order
        self.halves: list[Tensor] = []  # with grad: the mapped halves, concatenated by result()
        self.layer: Tensor | None = None  # at inference: the tensor layer, or the KeptFP8's body / scale / special
        self.scale: Tensor | None = None
        self.special: Tensor | None = None
        self.filled = 0

    def _frames(self, h: Tensor, s0: int, s1: int) -> Tensor:
        if self.order is None:
            return h[:, s0:s1]
        return h[torch.arange(h.shape[0], device=h.device)[:, None], self.order[:, s0:s1]]

    def put(self, half: Tensor, map: Callable[[Tensor], Tensor] | None = None) -> None:
        """Half number ``filled`` of the layer: [B, S, P, C]."""
        if self.filled >= self.groups:
            raise RuntimeError(f"KeptLayer: all {self.groups} halves are in already")
        g, f = self.filled, map or (lambda t: t)
        self.filled += 1
        B, S, P, C = half.shape
        if torch.is_grad_enabled() and not self.fp8:
            self.halves.append(f(self._frames(half, 0, S)))
            return
        step, pre = self.chunk or S, self.prefix
        for s0 in range(0, S, step):
            x = self._frames(half, s0, s0 + step)
            if self.fp8:
                special = f(x[:, :, :pre])
                if self.layer is None:
                    self.layer = torch.empty((B, S, P - pre, self.groups * C), dtype=FP8, device=half.device)
                    self.scale = torch.empty((B, S, P - pre, self.groups), dtype=torch.float32, device=half.device)
                    self.dtype = self.dtype or special.dtype
                    self.special = special.new_empty((B, S, pre, self.groups * C), dtype=self.dtype)
                body = self.layer.view(B, S, P - pre, self.groups, C)
                body[:, s0:s0 + step, :, g], self.scale[:, s0:s0 + step, :, g] = quantize_rows(f(x[:, :, pre:]))
                self.special[:, s0:s0 + step, :, g * C:(g + 1) * C] = special
            else:
                y = f(x)
                if self.layer is None:
                    self.dtype = self.dtype or y.dtype
                    self.layer = y.new_empty((B, S, P, self.groups * C), dtype=self.dtype)
                self.layer[:, s0:s0 + step, :, g * C:(g + 1) * C] = y

    def result(self) -> Tensor | KeptFP8:
        if self.filled != self.groups:
            raise RuntimeError(f"KeptLayer: {self.filled} of {self.groups} halves put")
        if self.halves:
            out = torch.cat(self.halves, dim=-1)
            return out if self.dtype is None else out.to(self.dtype)
        if self.fp8:
            return KeptFP8(self.layer, self.scale, self.special, self.dtype)
        return self.layer


def kept_layer(halves: Sequence[Tensor], prefix: int, *, fp8: bool, chunk: int | None,
               maps: Sequence[Callable[[Tensor], Tensor] | None] | None = None,
               dtype: torch.dtype | None = None) -> Tensor | KeptFP8:
    """One kept layer: concat(halves) over channels (each through its map), as a tensor (in ``dtype`` when given)
    or, with ``fp8``, a KeptFP8 (KeptLayer with every half at once)."""
    layer = KeptLayer(len(halves), prefix, fp8=fp8, chunk=chunk, dtype=dtype)
    for h, f in zip(halves, maps or [None] * len(halves)):
        layer.put(h, f)
    return layer.result()


def kept_fp8_error(model, images: Tensor, **inputs) -> dict[str, tuple[float, float]]:
    """Error of the outputs with ``kept_fp8`` vs without, on ``images`` (the model's own precision, inference mode):
    {output: (rms / std, max / std)} of the reference output's spread."""
    import dataclasses

    config, results = model.config, []
    try:
        for fp8 in (False, True):
            model.config = dataclasses.replace(config, kept_fp8=fp8)
            with torch.inference_mode():
                out = model(images, **inputs)
            results.append({k: v.float() for k, v in out.items() if isinstance(v, Tensor) and k != "images"})
    finally:
        model.config = config
    ref, got = results
    return {k: (float((got[k] - v).square().mean().sqrt() / v.std().clamp_min(1e-30)),
                float((got[k] - v).abs().max() / v.std().clamp_min(1e-30))) for k, v in ref.items()}
