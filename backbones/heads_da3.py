"""Depth Anything 3's DualDPT head: one shared token pyramid, two independent fusion chains (depth, ray).

Key names follow the official code (``norm``, ``projects.N``, ``resize_layers.N``, ``scratch.layerK_rn``,
``scratch.refinenetK[_aux]``, ``scratch.output_conv1``, ``scratch.output_conv2.{0,2}``,
``scratch.output_conv1_aux.L.{0..4}``, ``scratch.output_conv2_aux.L.{0,2,5}``).

Differences from VGGT's DPT head (``heads.DPTHead``) that matter for parity with the official implementation:
- the residual conv units use a non-in-place ReLU, so their skip adds x itself (VGGT's adds relu(x));
- the uv sin/cos position embedding is computed in float32 (VGGT's in float64);
- the main branch is depth (``exp``) + confidence (``1 + exp``); the auxiliary branch predicts a per-pixel ray
  (6 channels, linear) + confidence at 8x the patch grid, through its own four fusion blocks, five 3x3 convs
  and conv -> LayerNorm(channels) -> ReLU -> 1x1 conv. Only the last of the four aux levels is ever used, so only
  it is computed, and only when asked (``with_ray``): the official network discards the ray output whenever the
  camera decoder exists (always for DA3-Large).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import FeatureFusionBlock, interpolate_chunked, make_resize_layers, make_scratch, uv_grid
from .kept import KeptFP8, frames


class Permute(nn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


def _sincos32(pos: Tensor, dim: int, omega_0: float = 100.0) -> Tensor:
    """[M] -> [M, dim] = [sin(pos w), cos(pos w)], w_i = omega_0 ** (-2i/dim), float32 math (as DA3)."""
    omega = torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0**omega
    out = pos.reshape(-1).float()[:, None] * omega[None]
    return torch.cat((out.sin(), out.cos()), dim=1)


def add_uv_embed(x: Tensor, image_hw: tuple[int, int], ratio: float = 0.1) -> Tensor:
    """x [N, C, h, w] + 0.1 * uv sin/cos embedding (grid spanning the image's aspect ratio)."""
    _, C, h, w = x.shape
    H, W = image_hw
    grid = uv_grid(w, h, aspect_ratio=W / H, dtype=x.dtype, device=x.device).reshape(-1, 2)
    emb = torch.cat((_sincos32(grid[:, 0], C // 2), _sincos32(grid[:, 1], C // 2)), dim=-1)  # [h*w, C]
    return x + (emb.view(h, w, C) * ratio).permute(2, 0, 1)[None].to(x.dtype)


class DualDPT(nn.Module):
    """``forward(feats, image_hw, frames_chunk_size, with_ray)``: feats = 4 tensors [B, S, N_patch, dim_in] (or
    ``KeptFP8``, dequantised one chunk at a time) -> dict depth [B,S,H,W], depth_conf [B,S,H,W] (+ ray
    [B,S,8h,8w,6], ray_conf [B,S,8h,8w] with ``with_ray``)."""

    def __init__(
        self,
        dim_in: int,
        *,
        patch_size: int = 14,
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        head_features_2: int = 32,
        aux_levels: int = 4,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, kernel_size=1) for oc in out_channels])
        self.resize_layers = make_resize_layers(out_channels)
        sc = self.scratch = make_scratch(out_channels, features)
        for suffix in ("", "_aux"):
            for k in (1, 2, 3, 4):
                block = FeatureFusionBlock(features, has_residual=k != 4, relu_skip=False)
                sc.add_module(f"refinenet{k}{suffix}", block)
        sc.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        sc.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, head_features_2, 3, padding=1), nn.ReLU(), nn.Conv2d(head_features_2, 2, 1)
        )
        half = features // 2
        sc.output_conv1_aux = nn.ModuleList(
            [
                nn.Sequential(*[nn.Conv2d(a, b, 3, padding=1) for a, b in ((features, half), (half, features)) * 2],
                              nn.Conv2d(features, half, 3, padding=1))
                for _ in range(aux_levels)
            ]
        )
        sc.output_conv2_aux = nn.ModuleList(
            [
                nn.Sequential(
                    nn.Conv2d(half, head_features_2, 3, padding=1),
                    Permute((0, 2, 3, 1)), nn.LayerNorm(head_features_2), Permute((0, 3, 1, 2)),
                    nn.ReLU(),
                    nn.Conv2d(head_features_2, 7, 1),
                )
                for _ in range(aux_levels)
            ]
        )

    def forward(
        self, feats: Sequence[Tensor | KeptFP8], image_hw: tuple[int, int], frames_chunk_size: int | None = 8,
        with_ray: bool = False,
    ) -> dict[str, Tensor]:
        B, S = feats[0].shape[:2]
        n = B * S
        step = n if not frames_chunk_size or frames_chunk_size >= n else frames_chunk_size
        out: dict[str, Tensor] = {}
        for s0 in range(0, n, step):
            part = self.forward_frames([frames(f, s0, s0 + step) for f in feats], image_hw, with_ray)
            if step == n:
                return {k: v.unflatten(0, (B, S)) for k, v in part.items()}
            for k, v in part.items():  # written chunk by chunk: never the chunks and their concatenation at once
                if k not in out:
                    out[k] = v.new_empty((n, *v.shape[1:]))
                out[k][s0:s0 + step] = v
        return {k: v.unflatten(0, (B, S)) for k, v in out.items()}

    def forward_frames(self, feats: list[Tensor], image_hw: tuple[int, int], with_ray: bool) -> dict[str, Tensor]:
        H, W = image_hw
        ph, pw = H // self.patch_size, W // self.patch_size
        levels = []
        for i, x in enumerate(feats):
            x = self.norm(x).permute(0, 2, 1).reshape(x.shape[0], -1, ph, pw)
            levels.append(self.resize_layers[i](add_uv_embed(self.projects[i](x), image_hw)))
        sc = self.scratch
        l1, l2, l3, l4 = sc.layer1_rn(levels[0]), sc.layer2_rn(levels[1]), sc.layer3_rn(levels[2]), sc.layer4_rn(levels[3])
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.output_conv1(sc.refinenet1(out, l1))
        out = interpolate_chunked(out, (ph * self.patch_size, pw * self.patch_size))
        logits = sc.output_conv2(add_uv_embed(out, image_hw)).float()  # activations in fp32
        result = {"depth": logits[:, 0].exp(), "depth_conf": logits[:, 1].exp() + 1}
        if with_ray:
            aux = sc.refinenet4_aux(l4, size=l3.shape[2:])
            aux = sc.refinenet3_aux(aux, l3, size=l2.shape[2:])
            aux = sc.refinenet2_aux(aux, l2, size=l1.shape[2:])
            aux = sc.output_conv1_aux[-1](sc.refinenet1_aux(aux, l1))
            ray = sc.output_conv2_aux[-1](add_uv_embed(aux, image_hw)).float().permute(0, 2, 3, 1)
            result["ray"], result["ray_conf"] = ray[..., :6], ray[..., 6].exp() + 1
        return result
