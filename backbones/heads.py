"""Dense prediction heads: the VGGT DPT head and its building blocks (reusable by DA3's DualDPT).

Key names follow the official code (``norm``, ``projects.N``, ``resize_layers.N``, ``scratch.layerK_rn``,
``scratch.refinenetK.{resConfUnit1,resConfUnit2,out_conv}``, ``scratch.output_conv1``, ``scratch.output_conv2.{0,2}``).

Numerics that matter for parity with the official implementation:
- ``ResidualConvUnit`` applies its ReLU *in place* to its input in the official code, so the skip connection adds
  relu(x), not x: ``out = relu(x) + conv2(relu(conv1(relu(x))))``. We compute that explicitly (no in-place ops).
- The sin/cos position embedding added to the DPT features is computed in float64 then cast to float32.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from lite3r_recon.errors import InvalidInput


# ----------------------------------------------------------------------------------------------- activations


def inverse_log_transform(y: Tensor) -> Tensor:
    """sign(y) * (exp(|y|) - 1)."""
    return torch.sign(y) * torch.expm1(torch.abs(y))


def activate_head(out: Tensor, activation: str, conf_activation: str) -> tuple[Tensor, Tensor]:
    """[N, C, H, W] -> (values [N, H, W, C-1], conf [N, H, W]) with the official activations."""
    fmap = out.permute(0, 2, 3, 1)
    xyz, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "inv_log":
        pts = inverse_log_transform(xyz)
    elif activation == "exp":
        pts = torch.exp(xyz)
    elif activation == "linear":
        pts = xyz
    else:
        raise InvalidInput(f"unknown activation {activation!r}")
    if conf_activation == "expp1":
        conf = 1 + conf.exp()
    elif conf_activation == "expp0":
        conf = conf.exp()
    elif conf_activation == "sigmoid":
        conf = torch.sigmoid(conf)
    else:
        raise InvalidInput(f"unknown conf_activation {conf_activation!r}")
    return pts, conf


# ----------------------------------------------------------------------------------------------- position embedding


def uv_grid(width: int, height: int, aspect_ratio: float, dtype=None, device=None) -> Tensor:
    """[height, width, 2] (u, v) grid spanning +-(aspect, 1)/diagonal, pixel centres (the MoGe/VGGT convention)."""
    diag = (aspect_ratio**2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=dtype, device=device)
    ys = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=dtype, device=device)
    uu, vv = torch.meshgrid(xs, ys, indexing="xy")
    return torch.stack((uu, vv), dim=-1)


def sincos_embed(pos: Tensor, dim: int, omega_0: float = 100.0) -> Tensor:
    """[M] positions -> [M, dim] = [sin(pos * w), cos(pos * w)], w_i = omega_0 ** (-2i/dim); float64 math."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat((out.sin(), out.cos()), dim=1).float()


def grid_pos_embed(x: Tensor, image_hw: tuple[int, int], ratio: float = 0.1) -> Tensor:
    """Add the DPT uv sin/cos embedding to a feature map x [N, C, h, w]."""
    N, C, h, w = x.shape
    H, W = image_hw
    grid = uv_grid(w, h, aspect_ratio=W / H, dtype=x.dtype, device=x.device).reshape(-1, 2)
    emb = torch.cat((sincos_embed(grid[:, 0], C // 2), sincos_embed(grid[:, 1], C // 2)), dim=-1)  # [h*w, C]
    emb = (emb.view(h, w, C) * ratio).permute(2, 0, 1).to(x.dtype)
    return x + emb[None]


# ----------------------------------------------------------------------------------------------- fusion blocks


class ResidualConvUnit(nn.Module):
    """skip + conv2(relu(conv1(relu(x)))) with skip = relu(x) for VGGT (see the module docstring for why) and
    skip = x for DA3 (`relu_skip=False`: its ReLU is not in place)."""

    def __init__(self, features: int, *, relu_skip: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)
        self.relu_skip = relu_skip

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x)
        return (h if self.relu_skip else x) + self.conv2(F.relu(self.conv1(h)))


class FeatureFusionBlock(nn.Module):
    """(x0 [+ rcu1(x1)]) -> rcu2 -> bilinear resize (align_corners) -> 1x1 out_conv."""

    def __init__(self, features: int, has_residual: bool = True, *, relu_skip: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features, relu_skip=relu_skip) if has_residual else None
        self.resConfUnit2 = ResidualConvUnit(features, relu_skip=relu_skip)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: Sequence[int] | None = None) -> Tensor:
        if self.resConfUnit1 is not None and skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = tuple(size) if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def make_scratch(in_channels: Sequence[int], features: int) -> nn.Module:
    """The ``scratch`` container with layer{1..4}_rn (3x3, no bias) projecting each level to ``features``."""
    scratch = nn.Module()
    for i, c in enumerate(in_channels, start=1):
        scratch.add_module(f"layer{i}_rn", nn.Conv2d(c, features, 3, padding=1, bias=False))
    return scratch


def make_resize_layers(out_channels: Sequence[int]) -> nn.ModuleList:
    """4x up (transposed conv), 2x up, identity, 2x down (strided conv): one per DPT level."""
    c = out_channels
    return nn.ModuleList(
        [
            nn.ConvTranspose2d(c[0], c[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(c[1], c[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(c[3], c[3], kernel_size=3, stride=2, padding=1),
        ]
    )


def interpolate_chunked(x: Tensor, size: tuple[int, int], mode: str = "bilinear", align_corners: bool = True) -> Tensor:
    """F.interpolate that splits the batch when the output would exceed the int32 indexing limit of the kernel."""
    limit = 1_610_612_736
    n = size[0] * size[1] * x.shape[0] * x.shape[1]
    if n <= limit:
        return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
    chunks = x.chunk(n // limit + 1, dim=0)
    return torch.cat([F.interpolate(c, size=size, mode=mode, align_corners=align_corners) for c in chunks], 0)


# ----------------------------------------------------------------------------------------------- DPT head


class DPTHead(nn.Module):
    """VGGT's DPT head: 4 token levels -> fused feature pyramid -> per-pixel (values, confidence).

    ``forward(tokens, image_hw, patch_start_idx, frames_chunk_size)``: ``tokens`` is indexable by layer index
    (a list with ``None`` for layers not kept is fine) giving [B, S, P, dim_in]; returns
    (values [B, S, H, W, output_dim-1], conf [B, S, H, W]). Frames are processed ``frames_chunk_size`` at a time
    (identical results, bounded peak memory).
    """

    def __init__(
        self,
        dim_in: int,
        *,
        patch_size: int = 14,
        output_dim: int = 4,
        activation: str = "inv_log",
        conf_activation: str = "expp1",
        features: int = 256,
        out_channels: Sequence[int] = (256, 512, 1024, 1024),
        intermediate_layer_idx: Sequence[int] = (4, 11, 17, 23),
        head_features_2: int = 32,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.activation = activation
        self.conf_activation = conf_activation
        self.intermediate_layer_idx = tuple(intermediate_layer_idx)
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, kernel_size=1) for oc in out_channels])
        self.resize_layers = make_resize_layers(out_channels)
        self.scratch = make_scratch(out_channels, features)
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        self.scratch.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, head_features_2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(head_features_2, output_dim, 1),
        )

    def forward(
        self,
        tokens: Sequence[Tensor | None],
        image_hw: tuple[int, int],
        patch_start_idx: int,
        frames_chunk_size: int | None = 8,
    ) -> tuple[Tensor, Tensor]:
        B, S = tokens[self.intermediate_layer_idx[0]].shape[:2]
        step = S if not frames_chunk_size or frames_chunk_size >= S else frames_chunk_size
        values = confs = None
        for s0 in range(0, S, step):
            chunk = [tokens[layer][:, s0:s0 + step, patch_start_idx:] for layer in self.intermediate_layer_idx]
            v, c = self.forward_frames(chunk, image_hw)
            if step == S:
                return v, c
            if values is None:  # written chunk by chunk: the chunks and their concatenation never exist at once
                values, confs = v.new_empty((B, S, *v.shape[2:])), c.new_empty((B, S, *c.shape[2:]))
            values[:, s0:s0 + step], confs[:, s0:s0 + step] = v, c
        return values, confs

    def forward_frames(self, chunk: list[Tensor], image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """One chunk of frames: the patch tokens [B, s, N_patch, dim_in] of each intermediate layer. Every chunk has
        the same shapes (but the last), so a compiled forward_frames is one graph (`recon.deploy.compile_model`)."""
        H, W = image_hw
        ph, pw = H // self.patch_size, W // self.patch_size
        feats = []
        for level, x in enumerate(chunk):
            B, s = x.shape[:2]
            x = self.norm(x.reshape(B * s, -1, x.shape[-1]).to(self.norm.weight.dtype))
            x = x.permute(0, 2, 1).reshape(B * s, -1, ph, pw)
            x = grid_pos_embed(self.projects[level](x), image_hw)
            feats.append(self.resize_layers[level](x))
        out = self.fuse(feats)
        out = interpolate_chunked(out, (ph * self.patch_size, pw * self.patch_size))
        out = self.scratch.output_conv2(grid_pos_embed(out, image_hw))
        # activations in fp32: with bf16 heads, exp() of a bf16 logit would round depth ~1 to 2**-8
        values, conf = activate_head(out.float(), self.activation, self.conf_activation)
        return values.unflatten(0, (B, s)), conf.unflatten(0, (B, s))

    def fuse(self, feats: list[Tensor]) -> Tensor:
        """Top-down fusion of the 4 levels, then output_conv1 (features -> features/2)."""
        sc = self.scratch
        l1, l2, l3, l4 = sc.layer1_rn(feats[0]), sc.layer2_rn(feats[1]), sc.layer3_rn(feats[2]), sc.layer4_rn(feats[3])
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.refinenet1(out, l1)
        return sc.output_conv1(out)
