"""VGGT's point-tracking head, state-dict compatible with the ``track_head.*`` keys of the official VGGT-1B file.

Architecture (facts read from the official facebookresearch/vggt code; written anew here):
- ``feature_extractor``: the DPT head in feature-only form: the same 4 token levels, projections, resize layers and
  top-down fusion as the depth/point heads, no sin/cos position embedding, ``output_conv1`` keeps ``features``
  channels, and the fused map is resized (bilinear, align_corners) to half the image size: [B, S, C, H/2, W/2].
- ``tracker`` (a CoTracker/VGGSfM-style iterative predictor, stride 2): the feature maps are LayerNorm'd over
  channels; each query's feature is sampled bilinearly (border padding, align_corners) in frame 0 and copied to all
  frames; then ``iters`` times: a ``corr_levels``-level correlation pyramid (avg-pool by 2 per level; dot products
  over sqrt(C), sampled on a (2r+1)^2 window around the current estimate, zero padding), an MLP of the
  correlations, a sin/cos embedding of the motion relative to frame 0 (linear frequencies ``k * 1000 / C``,
  sin/cos interleaved) plus the motion / 518 twice, the current track feature, the 2D sin/cos grid embedding sampled
  at the query, and a learned token (one for frame 0, one for the others) go through the update transformer, whose
  output moves the points (frame 0 stays at the query) and updates the track features. Visibility and confidence
  are sigmoids of linear maps of the final track features.
- update transformer: LayerNorm + linear in, ``depth`` x (attention over time per track, then 64 learned virtual
  tracks that cross-attend to the points, self-attend, and are attended by the points, per frame), residual from
  the input projection, LayerNorm + linear out (2 coordinates + the feature delta). Its blocks normalise their
  input *in place of* the residual stream (``x = norm1(x); x = x + attn(x)``), as the official code does.

Precision and students: the tracking head stays dense and full precision in a ``lite3r.swap_attention`` student.
Its attention is ``torch.nn.MultiheadAttention``, not a qkv/proj module, so SLA does not take it (its sequences
are short: S frames, or the points plus 64 virtual tracks); its linears are ``PreciseLinear``, which the FP8 swap
(exact ``nn.Linear`` only) leaves alone. Why: on the parity input, FP8 fake quant on the tracker's 50 linears
moved the tracks by 0.06 px after the first refinement and 1.5 px after the fourth, for a few percent of the
model's FLOPs. The feature extractor is convolutions, which no swap touches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lite3r_recon.errors import InvalidInput

from .heads import DPTHead, interpolate_chunked, sincos_embed
from .layers import Mlp

MOTION_SCALE = 518.0  # the official tracker divides motion by its training image size


def min_track_size(corr_levels: int, stride: int = 2) -> int:
    """Smallest image side (pixels) whose stride-`stride` feature map survives `corr_levels` - 1 halvings."""
    return stride * 2 ** (corr_levels - 1)


class PreciseLinear(nn.Linear):
    """An nn.Linear that FP8 swaps pass over (they convert exact ``nn.Linear`` only, the way torch's
    NonDynamicallyQuantizableLinear opts out of quantization): the tracks regress through these."""


def _keep_precise(module: nn.Module) -> None:
    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = PreciseLinear  # same parameters and keys, no copy


# ----------------------------------------------------------------------------------------------- features


class TrackFeatures(DPTHead):
    """DPT fusion without position embedding or prediction convs: tokens -> feature maps [B, S, C, H/2, W/2]."""

    def __init__(self, dim_in: int, *, features: int, **dpt) -> None:
        super().__init__(dim_in, features=features, **dpt)
        del self.scratch.output_conv2
        self.scratch.output_conv1 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, tokens, image_hw: tuple[int, int], patch_start_idx: int,
                frames_chunk_size: int | None = 8) -> Tensor:
        S = tokens[self.intermediate_layer_idx[0]].shape[1]
        step = S if not frames_chunk_size or frames_chunk_size >= S else frames_chunk_size
        maps = [self.forward_frames([tokens[layer][:, s0:s0 + step, patch_start_idx:]
                                     for layer in self.intermediate_layer_idx], image_hw) for s0 in range(0, S, step)]
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)

    def forward_frames(self, chunk: list[Tensor], image_hw: tuple[int, int]) -> Tensor:
        H, W = image_hw
        ph, pw = H // self.patch_size, W // self.patch_size
        B, s = chunk[0].shape[:2]
        feats = []
        for level, x in enumerate(chunk):
            x = self.norm(x.reshape(B * s, -1, x.shape[-1]).to(self.norm.weight.dtype))
            x = x.permute(0, 2, 1).reshape(B * s, -1, ph, pw)
            feats.append(self.resize_layers[level](self.projects[level](x)))
        out = interpolate_chunked(self.fuse(feats), (ph * self.patch_size // 2, pw * self.patch_size // 2))
        return out.unflatten(0, (B, s))


# ----------------------------------------------------------------------------------------------- sampling


def sample_points(maps: Tensor, xy: Tensor, padding_mode: str = "border") -> Tensor:
    """Bilinear samples of maps [N, C, h, w] at pixel coordinates xy [N, ..., 2] (x, y; pixel centres at integers,
    align_corners) -> [N, C, ...]."""
    h, w = maps.shape[-2:]
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=xy.device)
    grid = (xy.float() * scale - 1).reshape(xy.shape[0], -1, 1, 2)  # fp32: bf16 would be ~1 px off at 259 px
    out = F.grid_sample(maps.float(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    return out.reshape(*out.shape[:2], *xy.shape[1:-1])


def grid_embedding(dim: int, h: int, w: int, device=None) -> Tensor:
    """[1, dim, h, w]: sin/cos of the column index (first dim/2 channels) and of the row index (last dim/2)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    emb = torch.cat((sincos_embed(xs.reshape(-1), dim // 2, omega_0=10000.0),
                     sincos_embed(ys.reshape(-1), dim // 2, omega_0=10000.0)), dim=-1)
    return emb.T.reshape(1, dim, h, w)


def motion_embedding(flow: Tensor, dim: int) -> Tensor:
    """flow [..., 2] -> [..., 2 * dim]: per axis, sin/cos (interleaved) of flow * k * 1000 / dim, k = 0, 2, 4, ..."""
    freq = torch.arange(0, dim, 2, device=flow.device, dtype=torch.float32) * (1000.0 / dim)
    ang = flow.float()[..., None] * freq  # [..., 2, dim/2]
    return torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-3)


class CorrPyramid:
    """Feature maps [B, S, C, h, w] averaged down by 2 per level; samples (2r+1)^2 correlation windows.

    The official tracker builds each level's whole correlation volume [B, S, N, h*w] and samples it bilinearly
    (``sample_volume``). Bilinear sampling is linear and zero padding is zero either way, so sampling the feature
    maps at the window points and taking dot products there (``sample_windows``) gives the same numbers to rounding
    with memory B*S*N*(2r+1)^2*C instead of B*S*N*h*w: at 518 x 518, 128 views and 1024 queries the level-0 volume
    alone is 35 GB. On a CPU the volume is faster while small, so ``sample`` takes it per level up to
    ``VOLUME_LIMIT`` elements and the windows beyond."""

    VOLUME_LIMIT = 2**27  # elements (512 MB in fp32)

    def __init__(self, fmaps: Tensor, levels: int, radius: int) -> None:
        B, S, C, h, w = fmaps.shape
        self.maps = [fmaps]
        for _ in range(levels - 1):
            fmaps = F.avg_pool2d(fmaps.flatten(0, 1), 2, stride=2).unflatten(0, (B, S))
            self.maps.append(fmaps)
        d = torch.arange(-radius, radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        # window index (a, b) looks at (x + d[a], y + d[b]): the official layout, which corr_mlp's weights expect
        self.offsets = torch.stack(torch.meshgrid(d, d, indexing="ij"), dim=-1).reshape(-1, 2)  # [(2r+1)^2, 2]

    def _windows(self, coords: Tensor, level: int) -> Tensor:
        B, S, N, _ = coords.shape
        return coords.reshape(B * S, N, 1, 2) / 2**level + self.offsets.to(coords.dtype)  # [B*S, N, K, 2]

    def sample(self, feats: Tensor, coords: Tensor, *, volume_limit: int | None = None) -> Tensor:
        """feats [B, S, N, C], coords [B, S, N, 2] (level-0 pixels) -> [B, S, N, levels * (2r+1)^2]."""
        limit = self.VOLUME_LIMIT if volume_limit is None else volume_limit
        B, S, N, _ = feats.shape
        return torch.cat([self._level_volume(feats, coords, i) if B * S * N * m.shape[-2] * m.shape[-1] <= limit
                          else self._level_windows(feats, coords, i) for i, m in enumerate(self.maps)], dim=-1)

    def sample_volume(self, feats: Tensor, coords: Tensor) -> Tensor:
        """`sample` as the official tracker computes it: the whole correlation volume per level, then sampled."""
        return torch.cat([self._level_volume(feats, coords, i) for i in range(len(self.maps))], dim=-1)

    def sample_windows(self, feats: Tensor, coords: Tensor) -> Tensor:
        """`sample` without correlation volumes: features sampled at the window points, then dot products."""
        return torch.cat([self._level_windows(feats, coords, i) for i in range(len(self.maps))], dim=-1)

    def _level_volume(self, feats: Tensor, coords: Tensor, i: int) -> Tensor:
        B, S, N, C = feats.shape
        maps = self.maps[i]
        h, w = maps.shape[-2:]
        corr = torch.matmul(feats, maps.reshape(B, S, C, h * w)) / math.sqrt(C)  # [B, S, N, h*w]
        xy = self._windows(coords, i).reshape(B * S * N, -1, 2)
        return sample_points(corr.reshape(B * S * N, 1, h, w), xy, "zeros").reshape(B, S, N, -1)

    def _level_windows(self, feats: Tensor, coords: Tensor, i: int) -> Tensor:
        B, S, N, C = feats.shape
        maps = self.maps[i].flatten(0, 1).contiguous(memory_format=torch.channels_last)  # faster sampling of C
        at = sample_points(maps, self._windows(coords, i), "zeros")  # [B*S, C, N, K]
        corr = torch.einsum("znc,zcnk->znk", feats.reshape(B * S, N, C).to(at.dtype), at) / math.sqrt(C)
        return corr.reshape(B, S, N, -1)


# ----------------------------------------------------------------------------------------------- update transformer


class AttnBlock(nn.Module):
    """norm1 -> x + self-attention -> x + mlp(norm2(x)) (the residual starts from the normalised input)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """norm1(x) attends to norm_context(context); then the MLP residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.norm1(x)
        context = self.norm_context(context)
        x = x + self.cross_attn(x, context, context, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class UpdateFormer(nn.Module):
    """[B, N, S, input_dim] track tokens -> [B, N, S, output_dim] updates; time attention, virtual-track space
    attention (keys ``updateformer.*``; ``virual_tracks`` is the official spelling)."""

    def __init__(self, input_dim: int, hidden_size: int, output_dim: int, *, depth: int = 6, num_heads: int = 8,
                 num_virtual_tracks: int = 64) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))
        self.time_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads) for _ in range(depth)])
        self.space_virtual_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads) for _ in range(depth)])
        self.space_point2virtual_blocks = nn.ModuleList([CrossAttnBlock(hidden_size, num_heads) for _ in range(depth)])
        self.space_virtual2point_blocks = nn.ModuleList([CrossAttnBlock(hidden_size, num_heads) for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        init = self.input_transform(self.input_norm(x))
        B, N, S, C = init.shape
        V = self.virual_tracks.shape[1]
        tokens = torch.cat((init, self.virual_tracks.expand(B, V, S, C).to(init.dtype)), dim=1)  # [B, N+V, S, C]
        for i in range(len(self.time_blocks)):
            tokens = self.time_blocks[i](tokens.reshape(B * (N + V), S, C)).reshape(B, N + V, S, C)
            space = tokens.transpose(1, 2).reshape(B * S, N + V, C)
            points, virtual = space[:, :N], space[:, N:]
            virtual = self.space_virtual2point_blocks[i](virtual, points)
            virtual = self.space_virtual_blocks[i](virtual)
            points = self.space_point2virtual_blocks[i](points, virtual)
            tokens = torch.cat((points, virtual), dim=1).reshape(B, S, N + V, C).transpose(1, 2)
        return self.flow_head(self.output_norm(tokens[:, :N] + init))


# ----------------------------------------------------------------------------------------------- tracker


@dataclass
class TrackContext:
    """Per-call tensors every refinement step reads: the pyramid, the query (feature pixels) [B, N, 2], and the
    grid embedding at the query plus the frame tokens [B*N, S, D]."""

    pyramid: CorrPyramid
    query: Tensor
    embed: Tensor


class Tracker(nn.Module):
    """Iterative point tracker on stride-2 feature maps (keys ``tracker.*``)."""

    def __init__(self, latent_dim: int = 128, *, hidden_size: int = 384, depth: int = 6, corr_levels: int = 7,
                 corr_radius: int = 4, stride: int = 2) -> None:
        super().__init__()
        self.latent_dim, self.corr_levels, self.corr_radius, self.stride = latent_dim, corr_levels, corr_radius, stride
        self.corr_mlp = Mlp(corr_levels * (2 * corr_radius + 1) ** 2, hidden_size, latent_dim)
        self.transformer_dim = 3 * latent_dim + 4  # motion embedding (+4 raw), correlations, track feature
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, self.transformer_dim))
        self.updateformer = UpdateFormer(self.transformer_dim, hidden_size, latent_dim + 2, depth=depth)
        self.fmap_norm = nn.LayerNorm(latent_dim)
        self.ffeat_norm = nn.GroupNorm(1, latent_dim)
        self.ffeat_updater = nn.Sequential(nn.Linear(latent_dim, latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(latent_dim, 1))
        _keep_precise(self)

    def forward(self, query_points: Tensor, fmaps: Tensor, iters: int = 4) -> tuple[list[Tensor], Tensor, Tensor]:
        """query_points [B, N, 2] (pixels of the image, x y; frame 0), fmaps [B, S, C, h, w] at 1/stride ->
        (tracks: one [B, S, N, 2] per iteration, in image pixels; vis [B, S, N]; conf [B, S, N], both in (0, 1))."""
        ctx, coords, feats = self.prepare(query_points, fmaps)
        tracks = []
        for _ in range(iters):
            coords, feats = self.step(ctx, coords, feats)
            tracks.append(coords * self.stride)
        return tracks, *self.scores(feats)

    def prepare(self, query_points: Tensor, fmaps: Tensor) -> tuple[TrackContext, Tensor, Tensor]:
        """What every iteration reads, and the initial state: coords [B, S, N, 2] (feature pixels) = the query in
        every frame, feats [B, S, N, C] = the query's frame-0 feature in every frame."""
        B, N, _ = query_points.shape
        S, C, h, w = fmaps.shape[1:]
        if min(h, w) < 2 ** (self.corr_levels - 1):
            side = min_track_size(self.corr_levels, self.stride)
            raise InvalidInput(f"tracking needs images of at least {side} px a side (a {self.corr_levels}-level "
                               f"correlation pyramid on 1/{self.stride} feature maps), got feature maps of {h}x{w}")
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        query = query_points.float() / self.stride  # coordinates stay fp32 under bf16 heads
        feats = sample_points(fmaps[:, 0], query).transpose(1, 2)  # [B, N, C]
        grid = grid_embedding(self.transformer_dim, h, w, fmaps.device).to(fmaps.dtype).expand(B, -1, -1, -1)
        pos = sample_points(grid, query).transpose(1, 2).reshape(B * N, 1, -1)  # [B*N, 1, D]
        ref = torch.cat((self.query_ref_token[:, :1], self.query_ref_token[:, 1:].expand(1, S - 1, -1)), dim=1)
        ctx = TrackContext(CorrPyramid(fmaps, self.corr_levels, self.corr_radius), query, pos + ref.to(pos.dtype))
        return ctx, query[:, None].expand(B, S, N, 2), feats[:, None].expand(B, S, N, C)

    def step(self, ctx: TrackContext, coords: Tensor, feats: Tensor) -> tuple[Tensor, Tensor]:
        """One refinement: (coords, feats) [B, S, N, 2 | C] -> the next (coords, feats)."""
        B, S, N, C = feats.shape
        coords = coords.detach()  # no gradient through the refinement history (as the official tracker)
        corr = self.corr_mlp(ctx.pyramid.sample(feats, coords).transpose(1, 2).reshape(B * N, S, -1))
        flow = (coords - coords[:, :1]).transpose(1, 2).reshape(B * N, S, 2)
        motion = torch.cat((motion_embedding(flow, C // 2), flow / MOTION_SCALE, flow / MOTION_SCALE), dim=-1)
        feats_bn = feats.transpose(1, 2).reshape(B * N, S, C)
        x = torch.cat((motion.to(corr.dtype), corr, feats_bn), dim=-1) + ctx.embed
        delta = self.updateformer(x.reshape(B, N, S, -1)).reshape(B * N, S, C + 2)
        feats_bn = feats_bn + self.ffeat_updater(self.ffeat_norm(delta[..., 2:].reshape(-1, C))).reshape(B * N, S, C)
        moved = coords + delta[..., :2].float().reshape(B, N, S, 2).transpose(1, 2)
        coords = torch.cat((ctx.query[:, None], moved[:, 1:]), dim=1)  # frame 0 stays at the query
        return coords, feats_bn.reshape(B, N, S, C).transpose(1, 2)

    def scores(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Final track features [B, S, N, C] -> (visibility, confidence) [B, S, N] in (0, 1)."""
        return (torch.sigmoid(self.vis_predictor(feats)[..., 0].float()),
                torch.sigmoid(self.conf_predictor(feats)[..., 0].float()))


class TrackHead(nn.Module):
    """Tokens of the DPT levels + query points in frame 0 -> tracks in every frame (keys ``track_head.*``)."""

    def __init__(self, dim_in: int, *, patch_size: int = 14, features: int = 128, iters: int = 4,
                 out_channels=(256, 512, 1024, 1024), intermediate_layer_idx=(4, 11, 17, 23), hidden_size: int = 384,
                 depth: int = 6, corr_levels: int = 7, corr_radius: int = 4) -> None:
        super().__init__()
        self.iters = iters
        self.feature_extractor = TrackFeatures(dim_in, features=features, patch_size=patch_size,
                                               out_channels=out_channels, intermediate_layer_idx=intermediate_layer_idx)
        self.tracker = Tracker(features, hidden_size=hidden_size, depth=depth, corr_levels=corr_levels,
                               corr_radius=corr_radius)

    def forward(self, tokens, image_hw: tuple[int, int], patch_start_idx: int, query_points: Tensor,
                iters: int | None = None, frames_chunk_size: int | None = 8) -> tuple[list[Tensor], Tensor, Tensor]:
        fmaps = self.feature_extractor(tokens, image_hw, patch_start_idx, frames_chunk_size)
        return self.tracker(query_points, fmaps, self.iters if iters is None else iters)
